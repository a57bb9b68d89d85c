#!/usr/bin/env bash
# Makes a headless Chromium available for the report test (tests/test_report.py renders the HTML
# report and screenshots it). Prints the browser's path on success and exits 0; exits 1 with a
# reason on stderr when it cannot be installed (no root, no apt, no network), and the test is
# then skipped with that reason.
#
# Order: $CHROMIUM (an explicit binary), a browser already on PATH, then Debian's `chromium`
# package through apt-get (needs root; `apt-get update` first).
set -uo pipefail

find_browser() {
    if [[ -n "${CHROMIUM:-}" && -x "${CHROMIUM}" ]]; then
        echo "${CHROMIUM}"
        return 0
    fi
    local name
    for name in chromium chromium-browser google-chrome google-chrome-stable; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if find_browser; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: no chromium on PATH and no apt-get to install it" >&2
    exit 1
fi
if [[ "$(id -u)" != "0" ]]; then
    echo "install_chromium.sh: no chromium on PATH and not root, so apt-get cannot install it" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >&2 || ! apt-get install -y -qq --no-install-recommends chromium >&2; then
    echo "install_chromium.sh: apt-get could not install the chromium package" >&2
    exit 1
fi
if find_browser; then
    exit 0
fi
echo "install_chromium.sh: chromium was installed but no browser binary is on PATH" >&2
exit 1
