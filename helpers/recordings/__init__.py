"""Every GPU recording, one file per topic, each with a ``GPU_RECORDINGS`` dict; registry lists them in run order
for `python -m helpers record`. Nothing below this layer imports it: domain modules only read results/."""
