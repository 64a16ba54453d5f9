"""A checkpoint's backbone as weights other tools load (official DINO key names, timm).

Export reads a checkpoint (through the checkpoint layer, which only knows bytes on disk) and
knows the architectures (it names the models that the weights fit), so it sits above both.
"""
