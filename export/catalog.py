"""The built-in model names and their one-line descriptions, importable without torch: `dit-export --list` and
`--help` answer from this at once, in an install without the export extra too. presets.PRESETS takes its
descriptions from here (a test keeps the names the same)."""

MODELS = {
    "digits": "class-conditional DiT trained on scikit-learn's 8x8 digits (16x16 grayscale, classes 0-9)",
    "text-digits": "text-to-image Sana-style model trained on the digits with captions such as 'a handwritten seven' "
    "or 'the digit 3' (16x16 grayscale; own Gemma-2-style encoder and DC-AE)",
    "dit-xl-2-256": "DiT-XL/2 at 256 px (architecture only)",
    "pixart-sigma-1024": "PixArt-Σ XL/2 at 1024 px (architecture only)",
    "sana-600m-1024": "Sana 0.6B at 1024 px (architecture only)",
    "sana-1600m-1024": "Sana 1.6B at 1024 px (architecture only)",
    "sd3-medium": "SD3-medium MMDiT at 1024 px (architecture only)",
    "sd35-medium": "SD3.5-medium MMDiT-X at 1024 px (architecture only)",
    "sd35-large": "SD3.5-large MMDiT at 1024 px (architecture only)",
    "flux-dev": "FLUX.1-dev at 1024 px (architecture only)",
    "flux-schnell": "FLUX.1-schnell at 1024 px (architecture only)",
}
