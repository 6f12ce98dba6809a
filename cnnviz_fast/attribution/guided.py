"""Work in progress: being written under the attribution issue."""


def deconvnet(*args, **kwargs):
    raise NotImplementedError("deconvnet is being written")


def guided_backprop(*args, **kwargs):
    raise NotImplementedError("guided_backprop is being written")
