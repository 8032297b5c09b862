"""A fitted model applied to new images, on either runtime (torch or onnx): the input recipe, the
threshold record evaluate writes, the overlay, the ONNX export and its parity check.

- inputs.py: the recipe that turns an image file into the model's input (both runtimes);
- torch_model.py: FittedModel (the pipeline's own code) and DeployedModule (the same as one module);
- onnx_model.py: the export to ONNX and OnnxModel (the file alone, through onnxruntime);
- runtimes.py: which models are deployable and `load_model` for either runtime;
- record.py: evaluate's scoring record (threshold, colour scale); overlay.py: the heatmap overlay;
- parity.py: onnxruntime against torch, within stated tolerances.
"""
