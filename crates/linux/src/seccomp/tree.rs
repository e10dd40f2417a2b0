//! Rewrites seccompiler's linear syscall dispatch into a binary search over number ranges.
//!
//! seccompiler emits one block per syscall with a rule, in syscall-number order, each tested in
//! turn: `jeq NR`, two `ja`s, then the block's rule chain. The default profile (~100 syscalls)
//! is 326 instructions, and both its length and its linear walk cost time at every sandbox
//! start, inside `seccomp(SECCOMP_SET_MODE_FILTER)`:
//!
//! * the kernel translates and JIT-compiles the program (a cost per instruction);
//! * since Linux 5.11 it fills its seccomp action cache by running the filter for every syscall
//!   number of the native arch (`seccomp_cache_prepare`): ~450 walks of up to ~200 steps.
//!
//! Installing the default profile took ~225 µs here. This pass keeps what each syscall's block
//! decides and rebuilds the dispatch in front of them:
//!
//! * a block that returns one action whatever the arguments (a plain deny) becomes no code at
//!   all: its number is part of a range that jumps to a shared `ret`;
//! * adjacent numbers with the same action merge into one range, and numbers no block tests
//!   join the default action's ranges;
//! * the ranges are found by a tree of `jge` tests, one instruction per split, whose `jt`/`jf`
//!   point straight at the shared `ret`s or at the blocks that look at arguments (copied
//!   unchanged). Where a target is beyond the 255 instructions `jt`/`jf` can reach, a `ja`
//!   (32-bit offset) is put in between.
//!
//! The result is about half as long and walks ~8 tests per syscall (the install: ~75 µs;
//! docs/PERFORMANCE.md). libseccomp has the same optimization (its binary tree); seccompiler
//! has none. Anything unexpected in the input is refused ([`SeccompError::Layout`]) rather
//! than guessed at, so a seccompiler upgrade that changes its layout fails the tests instead of
//! producing a wrong filter; the tests run both programs on every syscall number and compare.

use std::collections::{BTreeSet, HashSet};

use seccompiler::{BpfProgram, sock_filter};

use super::{BPF_JMP_JEQ_K, BPF_JMP_JGE_K, BPF_LD_W_ABS, BPF_RET_K, SECCOMP_DATA_NR, SeccompError};

/// BPF_JMP | BPF_JA.
const BPF_JMP_JA: u16 = 0x05;
/// The class bits of an opcode, and the jump class.
const BPF_CLASS_MASK: u16 = 0x07;
const BPF_JMP: u16 = 0x05;
/// seccompiler's arch check (load arch, compare, kill) and its load of the syscall number.
const HEAD_LEN: usize = 4;
/// How far `jt`/`jf` reach.
const SHORT_JUMP: usize = u8::MAX as usize;

/// One syscall's block: its number and everything after its `jeq`, up to the next block.
///
/// seccompiler enters a block with `ja 1` and leaves it (the number did not match) through a
/// chain of `ja`s that runs past each rule to the next block. In the rebuilt program a block
/// is only entered when the number matched; the `ja`s that left it go to the default action
/// instead, which is where the linear program ended up too (no other block tests the same
/// number).
struct Block<'a> {
    nr: u32,
    body: &'a [sock_filter],
}

/// What a range of syscall numbers leads to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Action {
    /// A `ret` of this value (shared by every range that returns it).
    Ret(u32),
    /// The block at this index, which looks at the arguments.
    Block(usize),
}

/// The rebuilt equivalent of seccompiler's `program` (before the prologue is spliced in).
pub(super) fn balance(program: &[sock_filter]) -> Result<BpfProgram, SeccompError> {
    let (head, blocks, default) = parse(program)?;
    let actions: Vec<Action> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| constant(b.body).map_or(Action::Block(i), Action::Ret))
        .collect();
    let ranges = ranges(&blocks, &actions, default.k);
    let tree = Tree::build(&ranges);
    // The shared returns, then the blocks that are still needed, after the tree.
    let rets: Vec<u32> = ranges
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Ret(k) => Some(*k),
            Action::Block(_) => None,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let kept: Vec<usize> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Block(i) => Some(*i),
            Action::Ret(_) => None,
        })
        .collect();
    let (mut wide, mut inline) = (HashSet::new(), HashSet::new());
    // Lay out, find jumps that do not reach, widen them, until all reach (each round only
    // adds instructions, so it ends).
    loop {
        let tree_start = head.len();
        let tree_len = tree.len(&wide, &inline);
        let mut at = tree_start + tree_len;
        let mut place = std::collections::HashMap::new();
        for k in &rets {
            place.insert(Action::Ret(*k), at);
            at += 1;
        }
        for i in &kept {
            place.insert(Action::Block(*i), at);
            at += blocks[*i].body.len() + usize::from(exits(blocks[*i].body));
        }
        let layout = Layout {
            wide: &wide,
            inline: &inline,
            place: &place,
        };
        let mut out = head.to_vec();
        let mut far = Vec::new();
        tree.emit(&mut out, &layout, &mut far);
        if !far.is_empty() {
            for f in far {
                match f {
                    Far::Node(id) => wide.insert(id),
                    Far::Leaf(id, side) => inline.insert((id, side)),
                };
            }
            continue;
        }
        debug_assert_eq!(out.len(), tree_start + tree_len);
        for k in &rets {
            out.push(sock_filter {
                code: BPF_RET_K,
                jt: 0,
                jf: 0,
                k: *k,
            });
        }
        for i in &kept {
            out.extend_from_slice(blocks[*i].body);
            if exits(blocks[*i].body) {
                out.push(default.clone());
            }
        }
        // Never longer than the input: a list of a few syscalls can be as short linear.
        return Ok(if out.len() <= program.len() {
            out
        } else {
            program.to_vec()
        });
    }
}

/// Whether a block has `ja`s that leave it (to the next block in the linear program): they
/// land on a `ret` of the default action put right after it.
fn exits(body: &[sock_filter]) -> bool {
    body.iter()
        .enumerate()
        .any(|(j, insn)| insn.code == BPF_JMP_JA && j + 1 + insn.k as usize == body.len())
}

/// The action a block takes whatever the arguments: its entry leads through `ja`s alone to a
/// `ret`.
fn constant(body: &[sock_filter]) -> Option<u32> {
    let mut pc = 0;
    loop {
        let insn = body.get(pc)?;
        match insn.code {
            BPF_JMP_JA => pc += 1 + insn.k as usize,
            BPF_RET_K => return Some(insn.k),
            _ => return None,
        }
    }
}

/// The number line cut into ranges, each `(first number, action)`, the first starting at 0:
/// block numbers with their actions, the numbers between them with `default`, neighbours with
/// the same action merged.
fn ranges(blocks: &[Block<'_>], actions: &[Action], default: u32) -> Vec<(u32, Action)> {
    let mut ranges: Vec<(u32, Action)> = vec![(0, Action::Ret(default))];
    let push = |ranges: &mut Vec<(u32, Action)>, from: u32, action: Action| {
        match ranges.last_mut() {
            Some(last) if last.1 == action => {}
            Some(last) if last.0 == from => *last = (from, action),
            _ => ranges.push((from, action)),
        }
        // A range replaced at its start may now equal the one before it.
        let n = ranges.len();
        if n >= 2 && ranges[n - 2].1 == ranges[n - 1].1 {
            ranges.pop();
        }
    };
    for (block, action) in blocks.iter().zip(actions) {
        push(&mut ranges, block.nr, *action);
        if let Some(next) = block.nr.checked_add(1) {
            push(&mut ranges, next, Action::Ret(default));
        }
    }
    ranges
}

/// Splits seccompiler's output into its head, its blocks (sorted by number) and the final
/// default `ret`, checking every assumption the rewrite relies on.
#[allow(clippy::type_complexity)]
fn parse(
    program: &[sock_filter],
) -> Result<(&[sock_filter], Vec<Block<'_>>, &sock_filter), SeccompError> {
    let layout = SeccompError::Layout;
    if program.len() < HEAD_LEN + 1 {
        return Err(layout("shorter than its head"));
    }
    let load_nr = &program[HEAD_LEN - 1];
    if (load_nr.code, load_nr.k) != (BPF_LD_W_ABS, SECCOMP_DATA_NR) {
        return Err(layout("no load of the syscall number after the arch check"));
    }
    let last = program.len() - 1;
    let default = &program[last];
    if default.code != BPF_RET_K {
        return Err(layout("the last instruction is not a return"));
    }
    let is_ja = |pc: usize| program[pc].code == BPF_JMP_JA;
    let mut blocks = Vec::new();
    let mut pc = HEAD_LEN;
    while pc < last {
        // jeq NR, 0, 1 / ja 1 (into the block) / ja (on towards the next block).
        let test = &program[pc];
        let shape_ok = (test.code, test.jt, test.jf) == (BPF_JMP_JEQ_K, 0, 1)
            && pc + 2 < last
            && (program[pc + 1].code, program[pc + 1].k) == (BPF_JMP_JA, 1)
            && is_ja(pc + 2);
        if !shape_ok {
            return Err(layout("a block does not start with jeq NR, ja 1, ja"));
        }
        // Where the chain of `ja`s that leaves the block lands: the next block.
        let mut end = pc + 2;
        while end < last && is_ja(end) {
            end += 1 + program[end].k as usize;
        }
        if end > last {
            return Err(layout("a block's exit runs past the program"));
        }
        let body = &program[pc + 1..end];
        check_self_contained(body)?;
        blocks.push(Block { nr: test.k, body });
        pc = end;
    }
    blocks.sort_by_key(|b| b.nr);
    if blocks.windows(2).any(|w| w[0].nr == w[1].nr) {
        return Err(layout("two blocks test the same syscall number"));
    }
    Ok((&program[..HEAD_LEN], blocks, default))
}

/// A body may jump only inside itself, or with `ja` to its end (leaving the block), and must
/// not run off its end, so it can be moved.
fn check_self_contained(body: &[sock_filter]) -> Result<(), SeccompError> {
    let len = body.len();
    for (i, insn) in body.iter().enumerate() {
        if insn.code & BPF_CLASS_MASK != BPF_JMP {
            continue;
        }
        let ok = if insn.code == BPF_JMP_JA {
            i + 1 + insn.k as usize <= len
        } else {
            i + 1 + usize::from(insn.jt) < len && i + 1 + usize::from(insn.jf) < len
        };
        if !ok {
            return Err(SeccompError::Layout("a block jumps out of itself"));
        }
    }
    match body.last() {
        Some(last) if matches!(last.code, BPF_RET_K | BPF_JMP_JA) => Ok(()),
        _ => Err(SeccompError::Layout("a block runs off its end")),
    }
}

/// The `ja` offset from the instruction at `from` to `to`.
fn offset(from: usize, to: usize) -> u32 {
    u32::try_from(to - (from + 1)).expect("a filter is at most 4096 long")
}

/// Which side of a node a child hangs on.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Side {
    Below,
    AtOrAbove,
}

/// A jump that does not reach: the node's `jt` (make it a `jge` + `ja` pair), or a leaf's
/// direct jump (put a `ja` in its place).
enum Far {
    Node(usize),
    Leaf(usize, Side),
}

/// Positions and the widening decided so far.
struct Layout<'a> {
    wide: &'a HashSet<usize>,
    inline: &'a HashSet<(usize, Side)>,
    place: &'a std::collections::HashMap<Action, usize>,
}

/// A search over ranges: a node sends numbers `>= at` one way and the rest the other.
enum Tree {
    Leaf(Action),
    Node {
        id: usize,
        at: u32,
        below: Box<Tree>,
        above: Box<Tree>,
    },
}

impl Tree {
    fn build(ranges: &[(u32, Action)]) -> Tree {
        let mut next_id = 0;
        Self::build_from(ranges, &mut next_id)
    }

    fn build_from(ranges: &[(u32, Action)], next_id: &mut usize) -> Tree {
        if let [(_, action)] = ranges {
            return Tree::Leaf(*action);
        }
        let mid = ranges.len() / 2;
        let id = *next_id;
        *next_id += 1;
        Tree::Node {
            id,
            at: ranges[mid].0,
            below: Box::new(Self::build_from(&ranges[..mid], next_id)),
            above: Box::new(Self::build_from(&ranges[mid..], next_id)),
        }
    }

    /// Instructions this subtree takes, as the child on `side` of node `parent` (a leaf takes
    /// one only when it was made an inline `ja`).
    fn len_as(
        &self,
        parent: Option<(usize, Side)>,
        wide: &HashSet<usize>,
        inline: &HashSet<(usize, Side)>,
    ) -> usize {
        match self {
            Tree::Leaf(_) => usize::from(parent.is_some_and(|p| inline.contains(&p))),
            Tree::Node {
                id, below, above, ..
            } => {
                1 + usize::from(wide.contains(id))
                    + below.len_as(Some((*id, Side::Below)), wide, inline)
                    + above.len_as(Some((*id, Side::AtOrAbove)), wide, inline)
            }
        }
    }

    fn len(&self, wide: &HashSet<usize>, inline: &HashSet<(usize, Side)>) -> usize {
        match self {
            // A lone range: one `ja` to its action.
            Tree::Leaf(_) => 1,
            Tree::Node { .. } => self.len_as(None, wide, inline),
        }
    }

    /// Appends the subtree to `out`; notes in `far` the jumps that do not reach.
    fn emit(&self, out: &mut Vec<sock_filter>, layout: &Layout<'_>, far: &mut Vec<Far>) {
        let insn = |code, jt, jf, k| sock_filter { code, jt, jf, k };
        let (id, at, below, above) = match self {
            Tree::Leaf(action) => {
                let to = layout.place[action];
                out.push(insn(BPF_JMP_JA, 0, 0, offset(out.len(), to)));
                return;
            }
            Tree::Node {
                id,
                at,
                below,
                above,
            } => (*id, *at, below, above),
        };
        let pc = out.len();
        let wide = layout.wide.contains(&id);
        let width = 1 + usize::from(wide);
        let below_len = below.len_as(Some((id, Side::Below)), layout.wide, layout.inline);
        // Where each child starts: right after the node (below) or after the below subtree;
        // a leaf not made inline is jumped to directly.
        let target = |child: &Tree, side: Side, start: usize| match child {
            Tree::Leaf(action) if !layout.inline.contains(&(id, side)) => layout.place[action],
            _ => start,
        };
        let below_at = target(below, Side::Below, pc + width);
        let above_at = target(above, Side::AtOrAbove, pc + width + below_len);
        let reach = |to: usize, from: usize| {
            let d = to - (from + 1);
            (d <= SHORT_JUMP).then_some(d as u8)
        };
        // jf: numbers below `at`.
        let jf = match reach(below_at, pc) {
            Some(d) => d,
            None => {
                far.push(Far::Leaf(id, Side::Below));
                0
            }
        };
        if wide {
            // jge at, 0, jf / ja above.
            out.push(insn(BPF_JMP_JGE_K, 0, jf, at));
            out.push(insn(BPF_JMP_JA, 0, 0, offset(pc + 1, above_at)));
        } else {
            let jt = match reach(above_at, pc) {
                Some(d) => d,
                None => {
                    far.push(match **above {
                        Tree::Leaf(_) => Far::Leaf(id, Side::AtOrAbove),
                        Tree::Node { .. } => Far::Node(id),
                    });
                    0
                }
            };
            out.push(insn(BPF_JMP_JGE_K, jt, jf, at));
        }
        for (child, side) in [(below, Side::Below), (above, Side::AtOrAbove)] {
            match &**child {
                Tree::Leaf(action) if layout.inline.contains(&(id, side)) => {
                    let to = layout.place[action];
                    out.push(insn(BPF_JMP_JA, 0, 0, offset(out.len(), to)));
                }
                Tree::Leaf(_) => {}
                node => node.emit(out, layout, far),
            }
        }
    }
}
