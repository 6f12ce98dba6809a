"""Work in progress: being written under the attribution issue."""


def integrated_gradients(*args, **kwargs):
    raise NotImplementedError("integrated_gradients is being written")


def saliency(*args, **kwargs):
    raise NotImplementedError("saliency is being written")


def smoothgrad(*args, **kwargs):
    raise NotImplementedError("smoothgrad is being written")
