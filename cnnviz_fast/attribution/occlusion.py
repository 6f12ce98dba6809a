"""Work in progress: being written under the attribution issue."""


def occlusion(*args, **kwargs):
    raise NotImplementedError("occlusion is being written")
