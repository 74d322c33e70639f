"""Generate one image with the public runtime API (no torch needed).

dit-export digits -o engines/digits
python examples/minimal.py engines/digits
"""

import sys

from ditrt.runtime import InputError, Pipeline


def main(engine_folder: str) -> None:
    with Pipeline.load(engine_folder) as pipe:  # checks the manifest and file hashes, opens the engines
        result = pipe(class_label=7, seed=0)  # steps and guidance default to the model's
        (path,) = result.save("digit-7.png", overwrite=True)
        print(f"{path}  seed={result.seeds[0]}  {result.timings_ms['total']:.0f} ms")
        try:
            pipe(class_label=12)
        except InputError as e:  # bad requests raise one clear error, the pipeline stays usable
            print(f"refused: {e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "engines/digits")
