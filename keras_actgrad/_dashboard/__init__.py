"""keras-actgrad's TensorBoard dashboard: the `actgrad` plugin and its page."""
