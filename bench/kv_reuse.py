"""Cold prefill vs KV reuse from each store tier; prints JSON. See inference/bench.py.

python bench/kv_reuse.py --model builtin --lengths 256,1024,3000
python bench/kv_reuse.py --device cuda --model-config qwen3-4b --lengths 1024,3774,8192,32768
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
