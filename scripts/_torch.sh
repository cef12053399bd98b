# Sourced by the scripts that build an environment (bootstrap.sh, test_verl.sh, test_vllm.sh); they
# define say(). install_torch KIND PIP...: torch first, so that no later requirement can pull another
# build of several gigabytes. KIND cpu: the local CPU build, torch==2.13.0; auto: that, or on a machine
# with nvidia-smi the CUDA build the index offers.
hide_noise() { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }

install_torch() {
    local kind=$1
    shift
    if [ "$kind" = auto ] && command -v nvidia-smi >/dev/null 2>&1; then
        say "installing torch (CUDA build)"
        "$@" torch
    else
        say "installing torch==2.13.0 (the local CPU build)"
        "$@" "torch==2.13.0" 2> >(hide_noise)
    fi
}
