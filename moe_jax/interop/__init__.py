"""Interop with the published DeepSeek-V2/V3 checkpoint format (config.json + safetensors)."""
