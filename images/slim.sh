#!/bin/sh
# Remove from the installed packages what no task loads at run time (measured: about 0.65 of 6.7 GB), in
# the same layer as the install, then check that every shared library a remaining one links is still there.
#   sh images/slim.sh SITE_PACKAGES
set -eu
site=${1:?usage: slim.sh SITE_PACKAGES}
cd "$site"
# the libraries linked by name (DT_NEEDED) that are in neither the packages nor the system; some always are
# (the driver's libcuda, NVSHMEM's optional network transports), so what counts is that none is added
unresolved() {
    find . -name '*.so*' -type f -exec readelf -d {} + 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' \
        | sort -u | while read -r lib; do
            [ -n "$(find . /usr/lib /lib -name "$lib" -print -quit 2>/dev/null)" ] || echo "$lib"; done
}
before=$(du -sm . | cut -f1)
unresolved_before=$(unresolved)
# the packages' own test suites (never imported by the packages themselves)
find . -depth -type d -name tests -prune -exec rm -rf {} +
# CUDA libraries nothing links or loads: multi-GPU cuSOLVER, the BLAS and FFTW shims, nvrtc's alternative
# build, the profiler-only nvperf and checkpoint/PC-sampling helpers, static archives for nvcc
rm -f nvidia/cu13/lib/libcusolverMg.so.* nvidia/cu13/lib/libnvblas.so.* nvidia/cu13/lib/libcufftw.so.* \
      nvidia/cu13/lib/libnvrtc.alt.so.* nvidia/cu13/lib/libnvrtc-builtins.alt.so.* \
      nvidia/cu13/lib/libnvperf_host.so nvidia/cu13/lib/libnvperf_target.so nvidia/cu13/lib/libcheckpoint.so \
      nvidia/cu13/lib/libpcsamplingutil.so nvidia/cu13/lib/*.a
# Triton's own CUPTI copies serve only its profiler (proton); torch's profiler uses nvidia/cu13's CUPTI
rm -rf triton/backends/nvidia/lib/cupti triton/backends/nvidia/lib/cupti-blackwell
added=$(unresolved | grep -vxF "$unresolved_before" || true)
[ -z "$added" ] || { echo "slim.sh: removed a library that is linked: $added" >&2; exit 1; }
echo "slim.sh: site-packages $before MB -> $(du -sm . | cut -f1) MB"
