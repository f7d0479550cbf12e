"""`GradientMonitor` on models that override `train_step`.

Reference: a hand replay of training, one tape per pass (`grad` in
custom_step_models: `tf.GradientTape`, `jax.value_and_grad`,
`torch.autograd.grad`), over the model's weights written out as tensors
(`ops.tanh(x @ kernel + bias)`), with a zero perturbation added at each
probe (its gradient is d loss / d probe output), and the SGD updates
applied by hand in NumPy.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

import keras_actgrad
from tests import custom_step_models as cm

BATCH = 8


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def dense(x, kernel, bias):
    return ops.matmul(x, kernel) + bias


def mlp_forward(params, x, perturbation):
    """A probed `mlp`: Dense(tanh) -> probe (+ perturbation) -> Dense."""
    k1, b1, k2, b2 = params
    h = ops.tanh(dense(x, k1, b1)) + perturbation
    return dense(h, k2, b2)


def tensors(arrays):
    return [ops.convert_to_tensor(a) for a in arrays]


def replay_gan(d_params, g_params, real, latent):
    """One GAN step by hand: (tap gradients, weight gradients, new params)."""
    n = real.shape[0]
    zeros_h = np.zeros((2 * n, cm.HIDDEN), "float32")
    g_zero = np.zeros((n, cm.HIDDEN), "float32")
    fake = mlp_forward(
        tensors(g_params), ops.convert_to_tensor(latent), ops.convert_to_tensor(g_zero)
    )
    fake = cm.numpy(fake).astype("float32")
    batch = ops.convert_to_tensor(np.concatenate([real, fake]))

    def d_loss(k1, b1, k2, b2, p):
        return cm._d_loss(mlp_forward([k1, b1, k2, b2], batch, p), n)

    _, grads = cm.grad(d_loss, tensors(d_params) + tensors([zeros_h]))
    grads = [cm.numpy(g) for g in grads]
    taps = {"d_optimizer/disc_probe": grads[4]}
    d_weight_grads = grads[:4]
    d_new = [
        (w - np.float32(cm.LR_D) * g.astype("float32")).astype("float32")
        for w, g in zip(d_params, d_weight_grads, strict=True)
    ]
    d_zero = np.zeros((n, cm.HIDDEN), "float32")
    x_latent = ops.convert_to_tensor(latent)
    d_fixed = tensors(d_new)

    def g_loss(k1, b1, k2, b2, pg, pd):
        fake = mlp_forward([k1, b1, k2, b2], x_latent, pg)
        return cm._g_loss(mlp_forward(d_fixed, fake, pd))

    _, grads = cm.grad(g_loss, tensors(g_params) + tensors([g_zero, d_zero]))
    grads = [cm.numpy(g) for g in grads]
    taps["g_optimizer/gen_probe"] = grads[4]
    taps["g_optimizer/disc_probe"] = grads[5]
    g_weight_grads = grads[:4]
    g_new = [
        (w - np.float32(cm.LR_G) * g.astype("float32")).astype("float32")
        for w, g in zip(g_params, g_weight_grads, strict=True)
    ]
    return taps, d_weight_grads, g_weight_grads, d_new, g_new


def params(model):
    return [
        np.array(v.numpy() if hasattr(v, "numpy") else v) for v in model.get_weights()
    ]


def fit_gan(callbacks, steps=3):
    model = cm.gan()
    real, latent = cm.gan_data(BATCH * steps)
    start = (params(model.discriminator), params(model.generator))
    model.fit(
        real,
        latent,
        batch_size=BATCH,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return model, start, (real, latent)


def test_gan_two_passes_against_hand_replay():
    plain, _, _ = fit_gan([])
    # Every statistic, and histograms: the most the step computes.
    monitor = keras_actgrad.GradientMonitor(
        statistics=None, histograms_every_n_steps=2, spike_factor=2.0
    )
    model, (d_params, g_params), (real, latent) = fit_gan([monitor])
    # Training unchanged, bit for bit.
    for a, b in zip(weights_of(plain), weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)
    assert monitor.probe_order == [
        "d_optimizer/disc_probe",
        "g_optimizer/gen_probe",
        "g_optimizer/disc_probe",
    ]
    d_paths = [v.path for v in model.discriminator.trainable_variables]
    g_paths = [v.path for v in model.generator.trainable_variables]
    assert len(monitor.events) == 3
    for step, event in enumerate(monitor.events):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        taps, d_grads, g_grads, d_params, g_params = replay_gan(
            d_params, g_params, real[rows], latent[rows]
        )
        for key, gradient in taps.items():
            np.testing.assert_allclose(
                event["statistics"][key]["grad_norm"],
                np.linalg.norm(gradient),
                rtol=1e-5,
                err_msg=f"step {step}, {key}",
            )
        for paths, grads, lr in (
            (d_paths, d_grads, cm.LR_D),
            (g_paths, g_grads, cm.LR_G),
        ):
            for path, gradient in zip(paths, grads, strict=True):
                np.testing.assert_allclose(
                    event["weight_grad_norms"][path],
                    np.linalg.norm(gradient),
                    rtol=1e-5,
                )
                np.testing.assert_allclose(
                    event["update_norms"][path],
                    lr * np.linalg.norm(gradient),
                    rtol=1e-4,
                )
        assert set(event["weight_grad_norms"]) == set(d_paths + g_paths)
        everything = np.concatenate([g.ravel() for g in d_grads + g_grads])
        np.testing.assert_allclose(
            event["global_grad_norm"], np.linalg.norm(everything), rtol=1e-5
        )
    # The replay's weights are the trained model's.
    for ours, theirs in zip(
        params(model.discriminator) + params(model.generator),
        d_params + g_params,
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def vae_reference(params, perturbations, batch):
    k1, b1, km, bm, kv, bv, *decoder = params
    pe, pd = perturbations
    x, noise = (ops.convert_to_tensor(a) for a in batch)
    h = ops.tanh(dense(x, k1, b1)) + pe
    mean, log_var = dense(h, km, bm), dense(h, kv, bv)
    z = mean + ops.exp(0.5 * log_var) * noise
    return cm.vae_loss(x, mean, log_var, mlp_forward(decoder, z, pd))[0]


def distillation_reference(teacher):
    def loss(params, perturbations, batch):
        x, y = (ops.convert_to_tensor(a) for a in batch)
        zero = ops.zeros((x.shape[0], cm.HIDDEN))
        teacher_logits = mlp_forward(tensors(teacher), x, zero)
        student_logits = mlp_forward(params, x, perturbations[0])
        return cm.distillation_loss(y, teacher_logits, student_logits)[0]

    return loss


CASES = {
    # model, data, trained sub-models, probes the step's pass crosses,
    # probes it does not (NaN gradient), learning rate
    "vae": (
        cm.vae,
        cm.vae_data,
        ("encoder", "decoder"),
        ("enc_probe", "dec_probe"),
        (),
        cm.LR_VAE,
    ),
    "distillation": (
        cm.distiller,
        cm.distillation_data,
        ("student",),
        ("student_probe",),
        ("teacher_probe",),
        cm.LR_STUDENT,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_optimizer_models_against_hand_replay(case):
    build, make_data, trained, crossed, uncrossed, lr = CASES[case]
    steps = 2
    x, y = make_data(BATCH * steps)

    def fit(callbacks):
        model = build()
        start = [np.array(w) for m in trained for w in getattr(model, m).get_weights()]
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks,
        )
        return model, start

    plain, _ = fit([])
    monitor = keras_actgrad.GradientMonitor(statistics=("grad_norm", "act_mean"))
    model, current = fit([monitor])
    for a, b in zip(weights_of(plain), weights_of(model), strict=True):
        np.testing.assert_array_equal(a, b)  # training unchanged, bit for bit
    if case == "distillation":
        loss_ref = distillation_reference(model.teacher.get_weights())
    else:
        loss_ref = vae_reference
    paths = [v.path for m in trained for v in getattr(model, m).trainable_variables]
    # Forward order (the teacher runs first).
    assert sorted(monitor.probe_order) == sorted(crossed + uncrossed)
    assert monitor.probe_order[0] == (uncrossed or crossed)[0]
    for step, event in enumerate(monitor.events):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        batch = (x[rows], y[rows])
        zeros = [np.zeros((BATCH, cm.HIDDEN), "float32") for _ in crossed]
        n = len(current)

        def loss(*ts, n=n, batch=batch):
            return loss_ref(list(ts[:n]), list(ts[n:]), batch)

        _, grads = cm.grad(loss, tensors(current + zeros))
        grads = [cm.numpy(g) for g in grads]
        for name, gradient in zip(crossed, grads[n:], strict=True):
            np.testing.assert_allclose(
                event["statistics"][name]["grad_norm"],
                np.linalg.norm(gradient),
                rtol=1e-5,
            )
        for name in uncrossed:
            assert np.isnan(event["statistics"][name]["grad_norm"])
        assert sorted(event["weight_grad_norms"]) == sorted(paths)
        for path, gradient in zip(paths, grads[:n], strict=True):
            np.testing.assert_allclose(
                event["weight_grad_norms"][path], np.linalg.norm(gradient), rtol=1e-5
            )
        current = [
            (w - np.float32(lr) * g.astype("float32")).astype("float32")
            for w, g in zip(current, grads[:n], strict=True)
        ]
    final = [np.array(w) for m in trained for w in getattr(model, m).get_weights()]
    for ours, theirs in zip(final, current, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


# -- TrainingLoss: activation_gradients and the callback ---------------------


def generator_loss(gan, latent):
    return cm._g_loss(gan.discriminator(gan.generator(latent)))


def generator_reference(gan, latent):
    """d generator loss / d (gen_probe, disc_probe): one tape, by hand."""
    g_params = tensors(params(gan.generator))
    d_params = tensors(params(gan.discriminator))
    x = ops.convert_to_tensor(latent)

    def loss(pg, pd):
        return cm._g_loss(mlp_forward(d_params, mlp_forward(g_params, x, pg), pd))

    zeros = np.zeros((latent.shape[0], cm.HIDDEN), "float32")
    _, grads = cm.grad(loss, tensors([zeros, zeros]))
    return {"gen_probe": cm.numpy(grads[0]), "disc_probe": cm.numpy(grads[1])}


def test_activation_gradients_with_a_training_loss():
    gan = cm.gan()
    _, latent = cm.gan_data(BATCH)
    results = keras_actgrad.activation_gradients(
        gan, latent, loss=keras_actgrad.TrainingLoss(generator_loss)
    )
    reference = generator_reference(gan, latent)
    assert list(results) == ["gen_probe", "disc_probe"]
    for name, gradient in reference.items():
        np.testing.assert_allclose(
            results[name].gradient, gradient, rtol=1e-5, atol=1e-8
        )


def test_callback_with_a_training_loss_on_a_gan():
    gan = cm.gan()
    real, latent = cm.gan_data(2 * BATCH)
    callback = keras_actgrad.ActivationGradientCallback(
        latent[:BATCH], loss=keras_actgrad.TrainingLoss(generator_loss)
    )
    gan.fit(real, latent, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    event = callback.events[-1]
    reference = generator_reference(gan, latent[:BATCH])  # the trained weights
    for name, gradient in reference.items():
        np.testing.assert_allclose(
            event["statistics"][name]["grad_norm"], np.linalg.norm(gradient), rtol=1e-5
        )


def test_a_model_without_call_names_what_to_use():
    gan = cm.gan()
    real, latent = cm.gan_data(BATCH)
    with pytest.raises(ValueError, match="TrainingLoss") as error:
        keras_actgrad.activation_gradients(gan, latent)
    assert "Received: loss='model'" in str(error.value)
    # The alternatives it names work on this model.
    keras_actgrad.activation_gradients(
        gan.discriminator,
        real,
        np.ones((BATCH, 1), "float32"),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
    )
    before = weights_of(gan)
    callback = keras_actgrad.ActivationGradientCallback(real, loss="sum")
    with pytest.raises(ValueError, match="TrainingLoss"):
        gan.fit(real, latent, batch_size=BATCH, verbose=0, callbacks=[callback])
    for a, b in zip(before, weights_of(gan), strict=True):
        np.testing.assert_array_equal(a, b)  # refused before the first step


def test_a_loss_function_of_the_wrong_signature_is_refused():
    def bad(y_true, y_pred, extra):
        return 0.0

    with pytest.raises(ValueError, match=r"function\(model, data\).*Received: "):
        keras_actgrad.TrainingLoss(bad)
    with pytest.raises(ValueError, match="Received: function=3"):
        keras_actgrad.TrainingLoss(3)


def test_a_loss_function_that_crosses_no_tap_is_refused_before_training():
    gan = cm.gan()
    real, latent = cm.gan_data(BATCH)
    before = weights_of(gan)
    no_probe = keras_actgrad.TrainingLoss(lambda model, data: ops.mean(data))
    callback = keras_actgrad.ActivationGradientCallback(latent, loss=no_probe)
    with pytest.raises(ValueError, match="runs no GradientProbe"):
        gan.fit(real, latent, batch_size=BATCH, verbose=0, callbacks=[callback])
    for a, b in zip(before, weights_of(gan), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_custom_step_that_crosses_no_tap_is_refused():
    # Probes only in the frozen teacher, which no gradient reaches.
    model = cm.distiller()
    model.student = keras_actgrad.strip_probes(model.student)
    x, y = cm.distillation_data(BATCH)
    before = weights_of(model)
    with pytest.raises(ValueError, match="reaches a tap"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            verbose=0,
            callbacks=[keras_actgrad.GradientMonitor()],
        )
    # TensorFlow traces the step before running it: refused before it
    # trains. (JAX too, but Keras's JAX `fit` keeps the weights outside the
    # variables and does not put them back after an error; PyTorch runs
    # the step eagerly: refused after the first.)
    if cm.BACKEND == "tensorflow":
        for a, b in zip(before, weights_of(model), strict=True):
            np.testing.assert_array_equal(a, b)


def test_optimizer_variables_accessor():
    # The one private Keras attribute read (Keras 3.15.1): fails loudly if
    # `BaseOptimizer._trainable_variables` moves.
    from keras_actgrad._engine.passes import optimizer_variables

    gan = cm.gan()
    got = optimizer_variables(gan.d_optimizer)
    assert [id(v) for v in got] == [
        id(v) for v in gan.discriminator.trainable_variables
    ]


def test_gan_layers_selected_in_place():
    # `layers=`: the hidden Dense layers of both sub-models, measured in
    # place; each feeds its probe unchanged, so its gradient is the probe's.
    monitor = keras_actgrad.GradientMonitor(layers=["disc_hidden", "gen_hidden"])
    model, (d_params, g_params), (real, latent) = fit_gan([monitor], steps=1)
    disc = model.discriminator.get_layer("disc_hidden").path
    gen = model.generator.get_layer("gen_hidden").path
    assert monitor.probe_order == [
        f"d_optimizer/{disc}",
        f"g_optimizer/{gen}",
        f"g_optimizer/{disc}",
    ]
    taps, *_ = replay_gan(d_params, g_params, real, latent)
    statistics = monitor.events[0]["statistics"]
    for key, name in (
        (f"d_optimizer/{disc}", "d_optimizer/disc_probe"),
        (f"g_optimizer/{gen}", "g_optimizer/gen_probe"),
        (f"g_optimizer/{disc}", "g_optimizer/disc_probe"),
    ):
        np.testing.assert_allclose(
            statistics[key]["grad_norm"], np.linalg.norm(taps[name]), rtol=1e-5
        )


def test_a_training_loss_is_not_split_into_chunks():
    gan = cm.gan()
    _, latent = cm.gan_data(BATCH)
    with pytest.raises(ValueError, match="probe_batch_size=None"):
        keras_actgrad.activation_gradients(
            gan,
            latent,
            loss=keras_actgrad.TrainingLoss(generator_loss),
            probe_batch_size=4,
        )


class _WGANGP(cm._GANBase):
    """keras.io's WGAN-GP shape: two critic updates per step, each with a
    gradient penalty (an inner tape inside the outer one)."""

    def train_step(self, data):
        import tensorflow as tf

        real, latent = data
        for _ in range(2):
            with tf.GradientTape() as tape:
                fake = self.generator(latent)
                mixed = 0.3 * real + 0.7 * fake
                with tf.GradientTape() as gp_tape:
                    gp_tape.watch(mixed)
                    critic = self.discriminator(mixed)
                slopes = gp_tape.gradient(critic, [mixed])[0]
                norms = ops.sqrt(ops.sum(ops.square(slopes), axis=1))
                penalty = ops.mean((norms - 1.0) ** 2)
                d_loss = (
                    ops.mean(self.discriminator(fake))
                    - ops.mean(self.discriminator(real))
                    + 10.0 * penalty
                )
            weights = self.discriminator.trainable_weights
            grads = tape.gradient(d_loss, weights)
            self.d_optimizer.apply_gradients(zip(grads, weights, strict=True))
        with tf.GradientTape() as tape:
            g_loss = -ops.mean(self.discriminator(self.generator(latent)))
        weights = self.generator.trainable_weights
        grads = tape.gradient(g_loss, weights)
        self.g_optimizer.apply_gradients(zip(grads, weights, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss}


@pytest.mark.requires_tensorflow(reason="a tf.GradientTape step")
def test_wgan_gp_nested_and_repeated_passes():
    def fit(callbacks):
        keras.utils.set_random_seed(0)
        model = _WGANGP(name="wgan")
        model.compile(keras.optimizers.Adam(1e-3), keras.optimizers.Adam(1e-3))
        real, latent = cm.gan_data(2 * BATCH)
        model.fit(real, latent, batch_size=BATCH, verbose=0, callbacks=callbacks)
        return model

    monitor = keras_actgrad.GradientMonitor()
    monitored, plain = fit([monitor]), fit([])
    for a, b in zip(weights_of(plain), weights_of(monitored), strict=True):
        np.testing.assert_array_equal(a, b)
    # The penalty's inner passes are applied by no optimizer (`pass<i>`);
    # the critic's two updates are `d_optimizer` and `d_optimizer@1`.
    labels = list(dict.fromkeys(key.split("/")[0] for key in monitor.probe_order))
    assert labels == ["pass0", "d_optimizer", "pass2", "d_optimizer@1", "g_optimizer"]
    event = monitor.events[-1]
    d_paths = [v.path for v in monitored.discriminator.trainable_variables]
    for path in d_paths:  # updated twice in the step
        assert path in event["weight_grad_norms"]
        assert f"{path}@1" in event["weight_grad_norms"]
    assert all(
        np.isfinite(values["grad_norm"]) for values in event["statistics"].values()
    )
