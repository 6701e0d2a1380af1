import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter (numpy on the CPU): that is how CI tests them.
# It must be set before the kernels are defined, i.e. before kernels.triton_scan is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
