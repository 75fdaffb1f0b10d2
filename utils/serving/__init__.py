"""The model manager (sole owner of loaded models), its entries, RAM tier, memory readings and
estimates, status reports, the quantized cache, and the inference service that leases models."""
