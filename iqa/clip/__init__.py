"""The CLIP system: towers, quality / consistency heads, data, evaluation, weight import."""
