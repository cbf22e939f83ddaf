# LeakSanitizer's reports at exit, kept where a leak has a frame in fasterrcnn_ext's library (scripts/sanitize.sh):
#   awk -f scripts/our_leaks.awk build/sanitize-<isa>/leaks.txt
# A report's block is one leak, up to a blank line (RS = ""). A frame is ours when it is symbolized: a path in our
# sources (csrc/ops/, csrc/runtime/, csrc/module.cpp, csrc/build_info.cpp: not torch's torch/csrc/autograd/ and the
# like), or a function name ("#N 0x... in NAME") on the same line as our library. A bare address attributed to
# _C.abi3.so is not one: the fast unwinder, walking up from libtorch_python without frame pointers, reads garbage words
# that fall in our mapping past its code (seen under tests/test_memory.py on pybind11's strdup).
BEGIN { RS = ""; ORS = "\n\n" }
/csrc\/(ops|runtime)\/|csrc\/(module|build_info)\.cpp|#[0-9]+ 0x[0-9a-f]+ in [^\n]*_C\.abi3\.so/ { print }
