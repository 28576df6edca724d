"""Score the damping pilot's models on held-out train-side windows (validation).

    python benchmarks/damping_validation.py [PATTERN]

PATTERN selects the pilot directories (default ``pilot_*``; e.g. ``pilot_4_64_*``).

Validation windows: the last 20 non-overlapping 512-token windows of the train side of
wiki-vital that the calibration protocol (32 windows drawn with numpy seed 0) did not draw.
"""

import glob
import sys
from pathlib import Path

import numpy as np

from qronos_onnx.calibration.data import all_windows, load_tokenizer, wiki_vital_text
from qronos_onnx.eval import evaluate_windows

TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m"
WORK = TOKENIZER.with_name("smollm2-135m-damping")  # where damping_pilot.py writes


def main() -> None:
    windows = all_windows(load_tokenizer(TOKENIZER)(wiki_vital_text("train")), 512)
    calibration = set(np.random.default_rng(0).choice(len(windows), 32, replace=False).tolist())
    held_out = [i for i in range(len(windows) - 1, -1, -1) if i not in calibration][:20]
    pattern = sys.argv[1] if len(sys.argv) > 1 else "pilot_*"
    for path in sorted(glob.glob(str(WORK / pattern / "m.onnx"))):
        result = evaluate_windows(path, windows[sorted(held_out)], progress=False)
        print(Path(path).parent.name, round(result.perplexity, 3), flush=True)


if __name__ == "__main__":
    main()
