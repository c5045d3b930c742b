"""Steering a live run from outside: the control channel (``trainctl ctl``) and the status file
(``trainctl status``). Torch-free: the CLI commands import this and nothing heavy."""
