"""Plain PyTorch shared by training and serving: the network, preprocessing presets, stored-model format
and face detection. Nothing here imports Lightning."""
