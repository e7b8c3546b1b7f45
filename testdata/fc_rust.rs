// fc_rust: a Rust program (its std has frame pointers, this crate has none
// with rustc -O) whose blocks are allocated by std's RawVec/String growth
// code. Built by the tests with `rustc -O -g` (legacy mangling) and with
// `-C symbol-mangling-version=v0`. Truth, live at exit, each block under
// fc_rust::<name> <- ... <- main:
//   f_vec      500,000 pushes of u32: capacity 524,288 x 4            = 2,097,152 B
//   f_shrunk   vec![7u8; 1 MiB], truncated to 777, shrink_to_fit      =       777 B
//   f_boxes    50 x Box<[u8; 2048]> (102,400 B) + the Vec of 50 boxes (400 B) = 102,800 B
//   f_string   String::with_capacity(123,456), then filled             =   123,456 B
// Usage: fc_rust (runs and exits 0 without dropping the blocks)
// Written for Rust 1.63 (Debian's rustc) and later: no std::hint::black_box.
use std::sync::atomic::{AtomicUsize, Ordering};

// SINK receives every block's address, so the optimizer cannot drop one.
static SINK: AtomicUsize = AtomicUsize::new(0);

fn keep<T>(p: *const T) {
    SINK.fetch_add(p as usize, Ordering::SeqCst);
}

#[inline(never)]
fn f_vec() -> Vec<u32> {
    let mut v = Vec::new();
    for i in 0..500_000u32 {
        v.push(i);
    }
    v
}

#[inline(never)]
fn f_shrunk() -> Vec<u8> {
    let mut v = vec![7u8; 1 << 20];
    v.truncate(777);
    v.shrink_to_fit();
    v
}

#[inline(never)]
fn f_boxes() -> Vec<Box<[u8; 2048]>> {
    (0..50u8).map(|i| Box::new([i; 2048])).collect()
}

#[inline(never)]
fn f_string() -> String {
    let mut s = String::with_capacity(123_456);
    for _ in 0..1000 {
        s.push_str("0123456789");
    }
    s
}

fn main() {
    let (a, b, c, d) = (f_vec(), f_shrunk(), f_boxes(), f_string());
    keep(a.as_ptr());
    keep(b.as_ptr());
    keep(c.as_ptr());
    for x in &c {
        keep(x.as_ptr());
    }
    keep(d.as_ptr());
    std::mem::forget((a, b, c, d));
    std::process::exit(0);
}
