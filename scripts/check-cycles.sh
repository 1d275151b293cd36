#!/usr/bin/env bash
# Fails when sibling modules of a workspace crate depend on each other in a circle: between
# the top-level modules of a crate, or between the children of one top-level module.
# Edges come from crate:: and super:: paths, test modules left out; see check-cycles.py.
#   scripts/check-cycles.sh              check the workspace
#   scripts/check-cycles.sh --self-test  check the checker on small made-up crates
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
checker="$root/scripts/check-cycles.py"

if [[ $# -eq 0 ]]; then
  exec python3 "$checker" --root "$root"
fi
if [[ $# -ne 1 || $1 != --self-test ]]; then
  echo "usage: $0 [--self-test]" >&2
  exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0

# new_workspace NAME: an empty workspace with one crate, fake, whose sources follow.
new_workspace() {
  ws="$tmp/$1"
  mkdir -p "$ws/fake/src"
  printf '[workspace]\nmembers = ["fake"]\n' >"$ws/Cargo.toml"
  printf '[package]\nname = "fake"\nversion = "0.1.0"\nedition = "2021"\n' >"$ws/fake/Cargo.toml"
}

# src PATH: writes stdin to fake/src/PATH of the current workspace.
src() {
  mkdir -p "$(dirname "$ws/fake/src/$1")"
  cat >"$ws/fake/src/$1"
}

# expect STATUS [NEEDLE...]: runs the checker on the current workspace and checks its exit
# status and that each needle is a line of its output.
expect() {
  local want="$1" got=0 out needle
  shift
  out="$(python3 "$checker" --root "$ws" 2>&1)" || got=$?
  if [[ $got -ne $want ]]; then
    echo "FAIL ($(basename "$ws")): exit $got, wanted $want; output:"
    awk '{ print "    " $0 }' <<<"$out"
    failures=$((failures + 1))
    return
  fi
  for needle in "$@"; do
    if ! grep -qxF -- "$needle" <<<"$out"; then
      echo "FAIL ($(basename "$ws")): no line '$needle' in:"
      awk '{ print "    " $0 }' <<<"$out"
      failures=$((failures + 1))
      return
    fi
  done
  echo "ok: $(basename "$ws")"
}

new_workspace cycle
src lib.rs <<'EOF'
pub mod a;
pub mod b;
EOF
src a.rs <<'EOF'
use crate::b::B;
pub struct A(pub B);
EOF
src b.rs <<'EOF'
pub struct B;
pub fn make() -> crate::a::A {
    crate::a::A(B)
}
EOF
expect 1 "fake: a -> b -> a" "    a -> b: fake/src/a.rs:1" "    b -> a: fake/src/b.rs:2 (+1 more)"

new_workspace no_cycle
src lib.rs <<'EOF'
pub mod a;
pub mod b;
pub mod c;
use crate::a::A;
EOF
src main.rs <<'EOF'
fn main() {}
EOF
src a.rs <<'EOF'
use crate::{b::B, c};
pub struct A(pub B, pub c::C);
EOF
src b.rs <<'EOF'
// crate::a::A is only named in this comment, /* crate::a */ this one,
/// the doc comment [`crate::a::A`],
pub const TEXT: &str = "the string crate::a::A and r#\"crate::a\"#";
pub const RAW: &str = r#"crate::a::A"#;
pub const QUOTE: char = '"';
pub struct B<'a>(pub &'a str);

#[cfg(test)]
mod tests {
    use crate::a::A;
    #[test]
    fn t() {
        let _ = super::super::a::A;
    }
}
EOF
src c/mod.rs <<'EOF'
pub mod x;
pub mod y;
#[cfg(test)]
mod z;
pub struct C;
EOF
src c/x.rs <<'EOF'
use super::y::Y;
pub struct X(pub Y);
EOF
src c/y.rs <<'EOF'
pub struct Y(pub super::C);
EOF
src c/z.rs <<'EOF'
use super::x::X;
pub fn back() -> super::super::a::A { todo!() }
EOF
expect 0 "ok: no module cycles in 1 crates"

new_workspace grouped_use_cycle
src lib.rs <<'EOF'
pub mod a;
pub mod b;
pub mod c;
EOF
src a.rs <<'EOF'
use crate::{
    b::{self, B},
    c::C as Renamed,
};
pub fn g() {}
EOF
src b.rs <<'EOF'
pub struct B;
EOF
src c.rs <<'EOF'
pub struct C;
#[macro_export]
macro_rules! call_g {
    () => {
        $crate::a::g()
    };
}
EOF
expect 1 "fake: a -> c -> a"

new_workspace nested_super_cycle
src lib.rs <<'EOF'
pub mod m;
EOF
src m/mod.rs <<'EOF'
pub mod x;
pub mod y;
EOF
src m/x.rs <<'EOF'
use super::y::Y;
pub struct X(pub Y);
EOF
src m/y/mod.rs <<'EOF'
pub mod deep;
pub struct Y;
EOF
src m/y/deep.rs <<'EOF'
pub fn f() -> super::super::x::X { todo!() }
EOF
expect 1 "fake: m::x -> m::y -> m::x" "    m::y -> m::x: fake/src/m/y/deep.rs:1"

if [[ $failures -ne 0 ]]; then
  echo "FAIL: $failures self-test case(s) of check-cycles failed"
  exit 1
fi
echo "ok: check-cycles self-test passed"
