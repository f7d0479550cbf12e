"""A tiny KerasHub GPT-2, measured in place at every block and sublayer.

No probe and no rebuilt model: `ActivationGradientCallback(layers=...)`
measures d loss / d (output) at every transformer block, every attention
layer and every MLP projection of a `keras_hub.models.GPT2CausalLM` while it
trains, and the model stays a `GPT2CausalLM` (it still generates).

The model has random weights (built from a config, offline) and learns a
synthetic token task made here: each sequence counts up from a random start
modulo the vocabulary, so the next token is the current one plus one.

Run with any backend:

    KERAS_BACKEND=jax python examples/kerashub_transformer.py

`ACTGRAD_EXAMPLE_QUICK=1` trains for fewer epochs on fewer sequences (used
by the tests).
"""

from __future__ import annotations

import argparse
import os
import shutil

import keras
import keras_hub
import numpy as np

import keras_actgrad

QUICK = os.environ.get("ACTGRAD_EXAMPLE_QUICK") == "1"
VOCABULARY, LENGTH = 32, 16


def counting_task(examples: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Sequences `s, s+1, s+2, ...` (mod the vocabulary); y is x shifted by one."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, VOCABULARY, size=(examples, 1))
    tokens = (start + np.arange(LENGTH + 1)) % VOCABULARY
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((examples, LENGTH), "int32"),
    }
    return x, tokens[:, 1:].astype("int32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3 if QUICK else 8)
    parser.add_argument("--log-dir", default=os.path.join("logs", "kerashub"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=LENGTH,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
        sampler="greedy",
    )
    x, y = counting_task(256 if QUICK else 2048)
    probe_x, probe_y = counting_task(32, seed=1)

    # Every block, every attention layer, every MLP projection: one-liners
    # that work on any KerasHub transformer (patterns work too, e.g.
    # layers=["transformer_layer_*", "*/self_attention"]).
    layers = (
        keras_actgrad.transformer_blocks(model)
        + keras_actgrad.attention_layers(model)
        + keras_actgrad.mlp_layers(model)
    )
    shutil.rmtree(args.log_dir, ignore_errors=True)
    callback = keras_actgrad.ActivationGradientCallback(
        (probe_x, probe_y), layers=layers, log_dir=args.log_dir
    )
    history = model.fit(
        x, y, epochs=args.epochs, batch_size=32, callbacks=[callback], verbose=0
    )
    print(
        f"next-token accuracy after {args.epochs} epochs: "
        f"{history.history['accuracy'][-1]:.3f}"
    )
    print(keras_actgrad.load_report(args.log_dir).table())
    print()

    # The model is still a GPT2CausalLM: it generates.
    prompt = {
        "token_ids": probe_x["token_ids"][:2],
        "padding_mask": np.array([[1] * 4 + [0] * (LENGTH - 4)] * 2, bool),
    }
    generated = model.generate(prompt, max_length=LENGTH, stop_token_ids=None)
    print(f"still a {type(model).__name__}; generate() continues a count:")
    for row in np.asarray(generated["token_ids"]):
        print("  " + " ".join(str(int(t)) for t in row))


if __name__ == "__main__":
    main()
