"""Independent PyTorch oracle for testing the Flax implementation in `cvc_jax`.

`video_resnet` holds 3D ResNets whose state-dict names match torchvision's video
ResNets and Hara's 3D-ResNets; `cvc_model` holds the pretraining model and its
loss terms, following the reference PyTorch code's semantics. Test-only code:
nothing in `cvc_jax` imports it.
"""
