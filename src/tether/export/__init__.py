"""Edge export (ONNX, FP16/INT8, TFLite, RKNN) and the inference runtime."""
