"""Pallas GPU kernels. Each op lives in its own folder with a plain-jnp reference beside it, block
sizes with defaults, a ``custom_vjp`` wrapper and an ``interpret`` flag so it runs on CPU."""
