"""Copying Hugging Face (PyTorch) weights into our abstract networks, for parity tests.

One `WeightCopier` per conversion: `put` fills a parameter from one HF tensor (shape and
dtype checked), `tied` records an HF tensor that shares storage with another, and
`check_complete` fails loudly if an HF tensor was not read or a parameter not set.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class WeightCopier:
    def __init__(self, hf_state):
        self.hf_state = hf_state
        self.used: set[str] = set()

    def put(self, var: nnx.Variable, name: str, transform=lambda w: w) -> None:
        self.used.add(name)
        value = transform(self.hf_state[name].detach().cpu().numpy())
        want = var.get_value()
        assert (value.shape, value.dtype) == (want.shape, want.dtype), (name, value.shape, want)
        var.set_value(jnp.asarray(value))

    def tied(self, name: str, to: str, message: str | None = None) -> None:
        """HF tensor `name` must be `to` (shared storage): nothing to copy."""
        assert self.hf_state[name].data_ptr() == self.hf_state[to].data_ptr(), message or name
        self.used.add(name)

    def check_complete(self, net: nnx.Module, ignore=lambda name: False) -> None:
        unread = {k for k in set(self.hf_state) - self.used if not ignore(k)}
        assert not unread, f"HF weights not copied: {sorted(unread)}"
        missing = [jax.tree_util.keystr(path) for path, x in
                   jax.tree_util.tree_leaves_with_path(nnx.state(net))
                   if not isinstance(x, jax.Array)]
        assert not missing, f"parameters not set from HF: {missing}"
