"""lavis_lite: a small research framework for Q-Former vision-language models (BLIP-2)."""
