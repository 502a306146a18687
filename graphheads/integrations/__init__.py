"""Integrations with other libraries; each submodule needs its optional extra."""
