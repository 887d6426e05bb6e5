"""GPT decoder built from megatron-core specs, plus its layout-independent initializer."""
