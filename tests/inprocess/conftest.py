"""The in-process ring: ComfyUI imported into the test process (no server), through one bootstrap.

tools.inprocess.load_comfy puts the host's ComfyUI (or COMFYUI_PATH) on sys.path after the
repository and forces the CPU; the pack's modules come from tools.inprocess.pack. Without a
ComfyUI tree the ring fails at collection rather than skipping.
"""
from tools.inprocess import load_comfy

load_comfy(cpu=True)
