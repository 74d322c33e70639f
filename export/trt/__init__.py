"""TensorRT engines from the plugin-lowered ONNX graphs: plugin definitions (plugins.py) and the builder (build.py).

Nothing here imports tensorrt until a function that needs it is called, so `dit-export` works without it.
"""
