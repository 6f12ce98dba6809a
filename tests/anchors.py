"""Helpers for comparing with the anchors (Captum, pytorch-grad-cam) in tests."""


def neuron_forward(model, neuron):
    """A forward function returning one neuron's value per image, built with a plain hook
    (Captum takes a forward function, not our Neuron targets)."""
    def forward(x):
        store = {}
        handle = model.get_submodule(neuron.layer).register_forward_hook(lambda m, a, o: store.setdefault("a", o))
        try:
            model(x)
        finally:
            handle.remove()
        a = store["a"][:, neuron.channel]
        return a.reshape(len(a), -1).mean(1) if neuron.y is None else a[:, neuron.y, neuron.x]
    return forward
