"""Models that override `train_step` (keras.io style), one per backend.

A GAN (two passes through the discriminator, two optimizers, no `call`),
a VAE (reconstruction + KL, a sampling layer) and a distillation model (a
frozen teacher). Each `train_step` is written as a user writes it for the
backend: `tf.GradientTape` (TensorFlow), `jax.value_and_grad` over
`stateless_call` (JAX), `loss.backward()` (PyTorch). The randomness (GAN
latents, VAE noise) comes in with the data, so that a hand replay sees the
same numbers.

`grad(f, tensors)`: the reference's one tape per pass, on each backend.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import keras_actgrad

BACKEND = keras.backend.backend()
LATENT, FEATURES, HIDDEN = 3, 4, 5
LR_D, LR_G = 0.1, 0.05


def grad(function, tensors):
    """`(value, [d value / d t for t in tensors])`: one tape, one pass."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = function(*tensors)
        return value, tape.gradient(value, tensors)
    if BACKEND == "jax":
        import jax

        return jax.value_and_grad(lambda ts: function(*ts))(list(tensors))
    import torch

    tensors = [t.detach().requires_grad_(True) for t in tensors]
    value = function(*tensors)
    return value, list(torch.autograd.grad(value, tensors, allow_unused=True))


def numpy(tensor):
    return np.asarray(ops.convert_to_numpy(tensor), np.float64)


def mlp(name, inputs, outputs, activation="tanh"):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(HIDDEN, activation=activation, name=f"{name}_hidden"),
            keras_actgrad.GradientProbe(name=f"{name}_probe"),
            keras.layers.Dense(outputs, name=f"{name}_out"),
        ],
        name=name,
    )


def bce(labels, logits):
    return ops.mean(keras.losses.binary_crossentropy(labels, logits, from_logits=True))


# -- GAN -------------------------------------------------------------------


def _d_loss(discriminator_out, n):
    labels = ops.concatenate([ops.ones((n, 1)), ops.zeros((n, 1))])
    return bce(labels, discriminator_out)


def _g_loss(discriminator_out):
    return bce(ops.ones_like(discriminator_out), discriminator_out)


class _GANBase(keras.Model):
    """keras.io's DCGAN shape: sub-models, two optimizers, no `call`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.discriminator = mlp("disc", FEATURES, 1)
        self.generator = mlp("gen", LATENT, FEATURES)
        self.built = True  # its sub-models are: `fit` need not call it

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.g_optimizer.build(self.generator.trainable_variables)


class _GANTensorFlow(_GANBase):
    def train_step(self, data):
        import tensorflow as tf

        real, latent = data
        n = ops.shape(real)[0]
        fake = self.generator(latent)
        with tf.GradientTape() as tape:
            d_out = self.discriminator(ops.concatenate([real, fake]))
            d_loss = _d_loss(d_out, n)
        weights = self.discriminator.trainable_weights
        grads = tape.gradient(d_loss, weights)
        self.d_optimizer.apply_gradients(zip(grads, weights, strict=True))
        with tf.GradientTape() as tape:
            g_loss = _g_loss(self.discriminator(self.generator(latent)))
        weights = self.generator.trainable_weights
        grads = tape.gradient(g_loss, weights)
        self.g_optimizer.apply_gradients(zip(grads, weights, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss}


class _GANTorch(_GANBase):
    def train_step(self, data):
        import torch

        real, latent = data
        n = ops.shape(real)[0]
        with torch.no_grad():
            fake = self.generator(latent)
        self.zero_grad()
        d_loss = _d_loss(self.discriminator(ops.concatenate([real, fake])), n)
        d_loss.backward()
        weights = self.discriminator.trainable_weights
        with torch.no_grad():
            self.d_optimizer.apply([v.value.grad for v in weights], weights)
        self.zero_grad()
        g_loss = _g_loss(self.discriminator(self.generator(latent)))
        g_loss.backward()
        weights = self.generator.trainable_weights
        with torch.no_grad():
            self.g_optimizer.apply([v.value.grad for v in weights], weights)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}


class _GANJax(_GANBase):
    """The JAX step: `stateless_call` and `jax.value_and_grad`, pure.

    The two optimizers are plain SGD, whose update reads no state, so their
    variables (the iteration counters) are read, not carried in `state`.
    """

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        real, latent = data
        n = real.shape[0]
        ids = [id(v) for v in self.trainable_variables]
        d_index = [ids.index(id(v)) for v in self.discriminator.trainable_variables]
        g_index = [ids.index(id(v)) for v in self.generator.trainable_variables]
        d_vars = [trainable[i] for i in d_index]
        g_vars = [trainable[i] for i in g_index]

        def generate(g_vars):
            return self.generator.stateless_call(g_vars, [], latent)[0]

        fake = generate(g_vars)

        def d_loss_fn(d_vars):
            out = self.discriminator.stateless_call(
                d_vars, [], ops.concatenate([real, fake])
            )[0]
            return _d_loss(out, n)

        d_loss, grads = jax.value_and_grad(d_loss_fn)(d_vars)
        d_vars, _ = self.d_optimizer.stateless_apply(
            [v.value for v in self.d_optimizer.variables], grads, d_vars
        )

        def g_loss_fn(g_vars):
            out = self.discriminator.stateless_call(d_vars, [], generate(g_vars))[0]
            return _g_loss(out)

        g_loss, grads = jax.value_and_grad(g_loss_fn)(g_vars)
        g_vars, _ = self.g_optimizer.stateless_apply(
            [v.value for v in self.g_optimizer.variables], grads, g_vars
        )
        trainable = list(trainable)
        for i, v in zip(d_index, d_vars, strict=True):
            trainable[i] = v
        for i, v in zip(g_index, g_vars, strict=True):
            trainable[i] = v
        logs = {"d_loss": d_loss, "g_loss": g_loss}
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


GAN = {"tensorflow": _GANTensorFlow, "jax": _GANJax, "torch": _GANTorch}[BACKEND]


def gan():
    keras.utils.set_random_seed(0)
    model = GAN(name="gan")
    model.compile(
        d_optimizer=keras.optimizers.SGD(LR_D), g_optimizer=keras.optimizers.SGD(LR_G)
    )
    return model


def gan_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n, FEATURES)).astype("float32")
    latent = rng.normal(size=(n, LATENT)).astype("float32")
    return real, latent


def split(model, x):
    """A probed `mlp`'s forward pass split at its probe: (probe output, head)."""
    hidden = model.get_layer(f"{model.name}_hidden")
    head = model.get_layer(f"{model.name}_out")
    return hidden(x), head


# -- one optimizer: VAE, distillation ----------------------------------------


class _OneOptimizer(keras.Model):
    """A model whose `losses_of(data, call)` is its training loss.

    `call(sub_model, x)` runs a sub-model: directly (TensorFlow, PyTorch)
    or with `stateless_call` on the values being differentiated (JAX).
    `train_step` is written per backend, as keras.io's VAE and
    distillation examples write it.
    """

    def train_step(self, *args):
        return {
            "tensorflow": self._step_tensorflow,
            "jax": self._step_jax,
            "torch": self._step_torch,
        }[BACKEND](*args)

    def _step_tensorflow(self, data):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss, logs = self.losses_of(data, lambda model, x: model(x))
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply(grads, self.trainable_weights)
        return logs

    def _step_torch(self, data):
        import torch

        self.zero_grad()
        loss, logs = self.losses_of(data, lambda model, x: model(x))
        loss.backward()
        grads = [v.value.grad for v in self.trainable_weights]
        with torch.no_grad():
            self.optimizer.apply(grads, self.trainable_weights)
        return {k: v.detach() for k, v in logs.items()}

    def _step_jax(self, state, data):
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        non_trainable_values = {
            id(v): value
            for v, value in zip(
                self.non_trainable_variables, non_trainable, strict=True
            )
        }

        def loss_fn(trainable):
            values = dict(non_trainable_values)
            values.update(
                {
                    id(v): t
                    for v, t in zip(self.trainable_variables, trainable, strict=True)
                }
            )

            def call(model, x):
                return model.stateless_call(
                    [values[id(v)] for v in model.trainable_variables],
                    [values[id(v)] for v in model.non_trainable_variables],
                    x,
                )[0]

            return self.losses_of(data, call)

        (_, logs), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, grads, trainable
        )
        state = (trainable, non_trainable, optimizer_variables, metrics_variables)
        return logs, state


class Sampling(keras.layers.Layer):
    """keras.io's VAE sampling, its noise given (z = mean + std * noise)."""

    def call(self, inputs):
        mean, log_var, noise = inputs
        return mean + ops.exp(0.5 * log_var) * noise


CODE = 2
LR_VAE = 0.05


class VAE(_OneOptimizer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(HIDDEN, activation="tanh", name="enc_hidden")(inputs)
        h = keras_actgrad.GradientProbe(name="enc_probe")(h)
        mean = keras.layers.Dense(CODE, name="enc_mean")(h)
        log_var = keras.layers.Dense(CODE, name="enc_log_var")(h)
        self.encoder = keras.Model(inputs, [mean, log_var], name="encoder")
        self.decoder = mlp("dec", CODE, FEATURES)
        self.sampling = Sampling()
        self.sampling.built = True  # no weights
        self.built = True

    def losses_of(self, data, call):
        x, noise = data
        mean, log_var = call(self.encoder, x)
        z = self.sampling([mean, log_var, noise])
        reconstruction = call(self.decoder, z)
        return vae_loss(x, mean, log_var, reconstruction)


def vae_loss(x, mean, log_var, reconstruction):
    reconstruction_loss = ops.mean(ops.sum(ops.square(x - reconstruction), axis=1))
    kl = -0.5 * (1 + log_var - ops.square(mean) - ops.exp(log_var))
    kl_loss = ops.mean(ops.sum(kl, axis=1))
    loss = reconstruction_loss + kl_loss
    return loss, {"loss": loss, "kl_loss": kl_loss}


def vae():
    keras.utils.set_random_seed(1)
    model = VAE(name="vae")
    model.compile(optimizer=keras.optimizers.SGD(LR_VAE))
    return model


def vae_data(n=16, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    noise = rng.normal(size=(n, CODE)).astype("float32")
    return x, noise


CLASSES, ALPHA, TEMPERATURE, LR_STUDENT = 3, 0.3, 2.0, 0.1


class Distiller(_OneOptimizer):
    """keras.io's knowledge distillation: a frozen teacher, a student."""

    def __init__(self, teacher, student, **kwargs):
        super().__init__(**kwargs)
        self.teacher = teacher
        self.student = student
        self.built = True

    def losses_of(self, data, call):
        x, y = data
        # keras.io calls the teacher outside the tape: no gradient flows
        # into it (and none reaches its probe).
        teacher_logits = ops.stop_gradient(call(self.teacher, x))
        return distillation_loss(y, teacher_logits, call(self.student, x))


def distillation_loss(y, teacher_logits, student_logits):
    student_loss = ops.mean(
        keras.losses.categorical_crossentropy(y, student_logits, from_logits=True)
    )
    soft_teacher = ops.softmax(teacher_logits / TEMPERATURE)
    soft_student = ops.softmax(student_logits / TEMPERATURE)
    distill = ops.mean(keras.losses.kl_divergence(soft_teacher, soft_student)) * (
        TEMPERATURE**2
    )
    loss = ALPHA * student_loss + (1 - ALPHA) * distill
    return loss, {"loss": loss, "distillation_loss": distill}


def distiller():
    keras.utils.set_random_seed(2)
    teacher = mlp("teacher", FEATURES, CLASSES)
    teacher.trainable = False
    student = mlp("student", FEATURES, CLASSES)
    model = Distiller(teacher, student, name="distiller")
    model.compile(optimizer=keras.optimizers.SGD(LR_STUDENT))
    return model


def distillation_data(n=16, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, n)]
    return x, y
