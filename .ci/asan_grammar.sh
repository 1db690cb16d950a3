#!/usr/bin/env bash
# Build the grammar's C core with AddressSanitizer and run the grammar tests against it.
#
# The instrumented module is built in a temporary folder and put in place of
# rexedge.runtime.decode._grammar inside the test process only, so the installed build (which
# other processes may be using) is left alone. PYTHONMALLOC=malloc lets ASan see the
# core's buffers (PyMem_New would otherwise carve them out of pymalloc's arenas); leak
# checking is off because CPython itself never frees everything at exit.
#
# pytest captures only sys.stdout/err (--capture=sys): an ASan report written to fd 2 must
# reach the terminal, not a capture file lost when ASan aborts the process.
#
# Usage (inside the virtualenv, from anywhere): .ci/asan_grammar.sh [extra pytest args]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cc="${CC:-gcc}"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT

suffix="$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
include="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
"$cc" -shared -fPIC -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all \
    -Wall -Wextra -Werror -std=c99 -I"$include" "$repo/runtime/decode/_grammar.c" -o "$build/_grammar$suffix"

cd "$repo"
LD_PRELOAD="$("$cc" -print-file-name=libasan.so):$("$cc" -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc GRAMMAR_ASAN_MODULE="$build/_grammar$suffix" \
python -P - "$@" <<'EOF'
import importlib.util
import os
import sys

import pytest

spec = importlib.util.spec_from_file_location("rexedge.runtime.decode._grammar", os.environ["GRAMMAR_ASAN_MODULE"])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["rexedge.runtime.decode._grammar"] = module
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--capture=sys", "tests/test_grammar.py", "tests/test_grammar_fuzz.py", *sys.argv[1:]]))
EOF
