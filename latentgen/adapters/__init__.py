"""Adapters (latentgen.contracts.adapter): attached to an assembled pipeline, they change what it computes and
are undone exactly on detach. One kind per file: `lora` (kohya-ss and diffusers/PEFT low-rank files),
`controlnet` (the released `control_model.*` layout), `embedding` (textual inversion)."""
