"""Work in progress: being written under the attribution issue."""


def saliency_to_mask(*args, **kwargs):
    raise NotImplementedError("saliency_to_mask is being written")
