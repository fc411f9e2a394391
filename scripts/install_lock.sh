# Sourced by scripts/bootstrap.sh and scripts/vllm_env.sh: install_lock PYTHON LOCKFILE installs exactly the
# versions pinned in LOCKFILE (requirements/*.txt, written by scripts/lock.sh), with --no-deps, so nothing is
# re-resolved and a release elsewhere cannot change the environment.
#
# torch is handled first and on its own:
#   - no NVIDIA driver (CPU machine): torch==<the lock's version without its +cpu tag>, unless that version is
#     already importable; these machines serve it as a local CPU wheel (elsewhere, install the CPU wheel of that
#     version from PyTorch's CPU index first, and it is kept);
#   - an NVIDIA GPU: an importable torch (and its triton) is kept, whatever its version; otherwise the lock's
#     version (a CUDA build).

# pip_q PYTHON ARGS...: a quiet `pip install` that keeps pip's exit status and drops this machine's noise about
# empty local index folders.
pip_q() {
    local out rc=0
    out="$("$1" -m pip install --disable-pip-version-check -q "${@:2}" 2>&1)" || rc=$?
    printf '%s\n' "$out" | grep -v -e '^WARNING: Location' -e '^$' >&2 || true
    return "$rc"
}

install_lock() {
    local vpy="$1" lock="$2" filtered torch_version have gpu=0
    [ -f "$lock" ] || { echo "[install] no lock file $lock (run: bash scripts/lock.sh)" >&2; return 1; }
    command -v nvidia-smi >/dev/null 2>&1 && gpu=1
    torch_version="$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$lock")"
    have="$("$vpy" -c 'from importlib.metadata import version; print(version("torch").split("+")[0])' 2>/dev/null || true)"
    if [ -z "$have" ] || { [ "$gpu" = 0 ] && [ "$have" != "$torch_version" ]; }; then
        echo "[install] torch==$torch_version" >&2
        # On a CPU machine the lock holds torch's dependencies too; a CUDA build needs its nvidia-* packages.
        if [ "$gpu" = 0 ]; then pip_q "$vpy" --no-deps "torch==$torch_version"; else pip_q "$vpy" "torch==$torch_version"; fi
    fi
    # pip, setuptools and wheel as locked, before the rest (they install it).
    pip_q "$vpy" --no-deps $(grep -E '^(pip|setuptools|wheel)==' "$lock" | cut -d' ' -f1)
    # What this environment holds: the lock, with the torch (and on a GPU the triton) really installed. Also the
    # constraint file for extras resolved on top (scripts/bootstrap.sh), so they can never move a pinned package.
    installed="$(dirname "$vpy")/../.lock-installed.txt"
    if [ "$gpu" = 1 ]; then
        grep -vE '^(torch|triton)==' "$lock" > "$installed"
        "$vpy" -c 'from importlib.metadata import version; print("triton==" + version("triton"))' >> "$installed" 2>/dev/null || true
    else
        grep -vE '^torch==' "$lock" > "$installed"
    fi
    "$vpy" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' >> "$installed" 2>/dev/null || true
    pip_q "$vpy" --no-deps -r "$installed"
    "$vpy" -c "import torch" || { echo "[install] torch does not import" >&2; return 1; }
}
