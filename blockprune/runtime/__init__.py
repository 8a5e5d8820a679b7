"""Private machinery shared by the stages (no stable API): workdir, offload, distributed, forwards."""
