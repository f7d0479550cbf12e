"""A GAN's generator starved by its discriminator: the saturating loss.

A small GAN on scikit-learn's bundled digits (offline), a `keras.Model`
subclass with a generator, a discriminator, two optimizers and its own
`train_step` (no `call`), trained twice:

- with the *saturating* generator loss of the original GAN paper,
  minimize log(1 - D(G(z))): once the discriminator wins (D(G(z)) -> 0)
  its gradient, D(G(z)) times the discriminator's, vanishes, and the
  generator stops learning;
- with the *non-saturating* loss, minimize -log D(G(z)): the same
  discriminator's verdict gives the generator a strong gradient.

`GradientMonitor` reads, at every step, d loss / d (probe output) in the
step's own backward passes: the discriminator's update (pass
`d_optimizer`) and the generator's (pass `g_optimizer`, through the
discriminator's probe and then the generator's). The report shows the
generator's gradient per epoch in both runs.

    python examples/gan_vanishing_gradients.py [--epochs 6] [--png gan.png]

`ACTGRAD_EXAMPLE_QUICK=1` runs fewer epochs (used by the tests). Runs on
TensorFlow, JAX and PyTorch (`KERAS_BACKEND`).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keras_actgrad  # noqa: E402

QUICK = os.environ.get("ACTGRAD_EXAMPLE_QUICK") == "1"
LATENT = 16
# A discriminator that learns fast (it soon tells digits from fakes) and a
# generator that learns slowly: the discriminator wins.
D_LR, G_LR = 0.5, 0.02
BACKEND = keras.backend.backend()


def discriminator_loss(real_logits, fake_logits):
    # -log D(x) - log(1 - D(G(z))), with D = sigmoid(logits).
    return ops.mean(ops.softplus(-real_logits)) + ops.mean(ops.softplus(fake_logits))


def generator_loss(fake_logits, saturating):
    if saturating:
        # minimize log(1 - D(G(z))) = -softplus(logits)
        return -ops.mean(ops.softplus(fake_logits))
    # minimize -log D(G(z)) = softplus(-logits)
    return ops.mean(ops.softplus(-fake_logits))


class GAN(keras.Model):
    """keras.io's DCGAN shape: sub-models, two optimizers, its own step.

    The latent codes come in with the data (`fit(images, latents)`), so
    the step is a pure function of its batch on every backend.
    """

    def __init__(self, saturating, **kwargs):
        super().__init__(**kwargs)
        self.saturating = saturating
        self.generator = keras.Sequential(
            [
                keras.Input((LATENT,)),
                keras.layers.Dense(64, activation="relu", name="gen_hidden"),
                keras_actgrad.GradientProbe(name="gen_probe"),
                keras.layers.Dense(64, activation="tanh", name="gen_image"),
            ],
            name="generator",
        )
        self.discriminator = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="leaky_relu", name="disc_hidden"),
                keras_actgrad.GradientProbe(name="disc_probe"),
                keras.layers.Dense(1, name="disc_logit"),
            ],
            name="discriminator",
        )
        self.built = True

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.g_optimizer.build(self.generator.trainable_variables)

    def _judge(self, real, fake, discriminator=None):
        """The discriminator's logits on real and fake images, in one call
        (as keras.io's DCGAN: one visit of its probe in that pass)."""
        discriminator = discriminator or self.discriminator
        logits = discriminator(ops.concatenate([real, fake]))
        n = ops.shape(real)[0]
        return logits[:n], logits[n:]

    def train_step(self, *args):
        if BACKEND == "jax":
            return self._train_step_jax(*args)
        if BACKEND == "torch":
            return self._train_step_torch(*args)
        return self._train_step_tensorflow(*args)

    def _train_step_tensorflow(self, data):
        import tensorflow as tf

        real, latent = data
        fake = self.generator(latent)
        with tf.GradientTape() as tape:
            d_loss = discriminator_loss(*self._judge(real, fake))
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply(tape.gradient(d_loss, weights), weights)
        with tf.GradientTape() as tape:
            fake_logits = self.discriminator(self.generator(latent))
            g_loss = generator_loss(fake_logits, self.saturating)
        weights = self.generator.trainable_weights
        self.g_optimizer.apply(tape.gradient(g_loss, weights), weights)
        return {"d_loss": d_loss, "d_of_fake": ops.mean(ops.sigmoid(fake_logits))}

    def _train_step_torch(self, data):
        import torch

        real, latent = data
        with torch.no_grad():
            fake = self.generator(latent)
        self.zero_grad()
        d_loss = discriminator_loss(*self._judge(real, fake))
        d_loss.backward()
        weights = self.discriminator.trainable_weights
        with torch.no_grad():
            self.d_optimizer.apply([w.value.grad for w in weights], weights)
        self.zero_grad()
        fake_logits = self.discriminator(self.generator(latent))
        generator_loss(fake_logits, self.saturating).backward()
        weights = self.generator.trainable_weights
        with torch.no_grad():
            self.g_optimizer.apply([w.value.grad for w in weights], weights)
        d_of_fake = ops.mean(ops.sigmoid(fake_logits.detach()))
        return {"d_loss": d_loss.detach(), "d_of_fake": d_of_fake}

    def _train_step_jax(self, state, data):
        # Pure, as Keras's JAX trainer wants: `stateless_call` and
        # `jax.value_and_grad`. Both optimizers are plain SGD, whose update
        # reads no state of its own, so their variables are not carried.
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        real, latent = data
        ids = [id(v) for v in self.trainable_variables]
        d_at = [ids.index(id(v)) for v in self.discriminator.trainable_variables]
        g_at = [ids.index(id(v)) for v in self.generator.trainable_variables]
        d_vars = [trainable[i] for i in d_at]
        g_vars = [trainable[i] for i in g_at]

        def disc(d_vars, x):
            return self.discriminator.stateless_call(d_vars, [], x)[0]

        def gen(g_vars):
            return self.generator.stateless_call(g_vars, [], latent)[0]

        fake = gen(g_vars)
        d_loss, grads = jax.value_and_grad(
            lambda d: discriminator_loss(*self._judge(real, fake, lambda x: disc(d, x)))
        )(d_vars)
        d_vars, _ = self.d_optimizer.stateless_apply(
            [v.value for v in self.d_optimizer.variables], grads, d_vars
        )

        def g_loss_fn(g_vars):
            fake_logits = disc(d_vars, gen(g_vars))
            return generator_loss(fake_logits, self.saturating), fake_logits

        (_, fake_logits), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(g_vars)
        g_vars, _ = self.g_optimizer.stateless_apply(
            [v.value for v in self.g_optimizer.variables], grads, g_vars
        )
        trainable = list(trainable)
        for i, value in zip(d_at + g_at, d_vars + g_vars, strict=True):
            trainable[i] = value
        logs = {"d_loss": d_loss, "d_of_fake": ops.mean(ops.sigmoid(fake_logits))}
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def train(saturating, images, epochs):
    keras.utils.set_random_seed(0)
    gan = GAN(saturating, name="gan")
    gan.compile(
        d_optimizer=keras.optimizers.SGD(D_LR), g_optimizer=keras.optimizers.SGD(G_LR)
    )
    latents = np.random.default_rng(0).normal(size=(len(images), LATENT))
    monitor = keras_actgrad.GradientMonitor()
    history = gan.fit(
        images,
        latents.astype("float32"),
        batch_size=64,
        epochs=epochs,
        verbose=0,
        callbacks=[monitor],
    )
    return monitor, history.history


def per_epoch(monitor, key):
    """The mean of a tap's grad_norm over each epoch's steps."""
    columns = monitor.to_numpy()
    values = columns[f"actgrad/{key}/grad_norm"]
    epochs = columns["epoch"]
    return [float(np.mean(values[epochs == e])) for e in np.unique(epochs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4 if QUICK else 8)
    parser.add_argument("--png", default=None, help="also plot the gradients here")
    args = parser.parse_args()

    images = (load_digits().data / 8.0 - 1.0).astype("float32")  # in [-1, 1]
    runs = {}
    for saturating in (True, False):
        name = "saturating" if saturating else "non-saturating"
        monitor, history = train(saturating, images, args.epochs)
        runs[name] = per_epoch(monitor, "g_optimizer/gen_probe")
        print(f"== {name} generator loss")
        print(f"passes measured: {', '.join(monitor.probe_order)}")
        print("epoch  D(G(z))  generator grad_norm (g_optimizer/gen_probe)")
        for epoch, (d_of_fake, norm) in enumerate(
            zip(history["d_of_fake"], runs[name], strict=True)
        ):
            print(f"{epoch:5d}  {d_of_fake:7.3f}  {norm:.3e}")
        print()
    ratio = runs["saturating"][-1] / runs["non-saturating"][-1]
    print(
        f"last epoch: the saturating generator's gradient is {ratio:.1e} times "
        "the non-saturating one's"
    )
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(figsize=(6, 3.5))
        for name, norms in runs.items():
            axes.semilogy(range(len(norms)), norms, marker="o", label=name)
        axes.set_xlabel("epoch")
        axes.set_ylabel("generator grad_norm (gen_probe)")
        axes.set_title("d loss / d generator hidden layer, generator pass")
        axes.legend()
        figure.tight_layout()
        figure.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
