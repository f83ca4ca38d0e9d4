"""The command-line tools, thin over the library: `dlg_jax.run` (one attack), `dlg_jax.sweep` (many)."""
