//! A pickle virtual machine restricted to what `torch.save` emits for a state dict.
//!
//! Python's unpickler can call any global, which makes loading an untrusted checkpoint
//! arbitrary code execution. This VM knows a fixed list of opcodes and exactly three kinds of
//! global — `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the `torch.*Storage`
//! types — and refuses everything else with an error naming the opcode or global.
//! The result is a tree of [`Value`]s in which tensors are plain descriptions
//! ([`TensorRef`]) of a storage key, offset, sizes and strides; no bytes are touched here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::{Error, Result};

/// Element type of a torch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    Bf16,
    /// Integer storages (e.g. BatchNorm's `num_batches_tracked`): dropped on import.
    I64,
    I32,
}

impl StorageDtype {
    fn from_global(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::Bf16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            _ => return None,
        })
    }
    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::Bf16 => 2,
            Self::I64 => 8,
        }
    }
}

/// One tensor as `_rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub dtype: StorageDtype,
    /// Storage key: its bytes are the zip entry `<root>/data/<key>`.
    pub key: String,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    Storage(StorageDtype),
}

pub type Shared<T> = Rc<RefCell<T>>;

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Rc<Vec<Value>>),
    List(Shared<Vec<Value>>),
    Dict(Shared<Vec<(Value, Value)>>),
    Tensor(Rc<TensorRef>),
    Storage(Rc<(StorageDtype, String)>),
    Global(Rc<GlobalRef>),
}

/// Opaque handle for an allowed global.
#[derive(Debug)]
pub struct GlobalRef(Global);

fn err(msg: impl Into<String>) -> Error {
    Error::Import(format!("pickle: {}", msg.into()))
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| err(format!("truncated at byte {}", self.pos)))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = self.bytes.get(self.pos..).unwrap_or(&[]);
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| err("unterminated GLOBAL line"))?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| err("GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }
}

/// Runs the pickle in `bytes` and returns the object it builds.
pub fn load(bytes: &[u8]) -> Result<Value> {
    let mut r = Reader { bytes, pos: 0 };
    let mut stack: Vec<Value> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: HashMap<u32, Value> = HashMap::new();
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                let proto = r.u8()?;
                if proto > 5 {
                    return Err(err(format!("unsupported protocol {proto}")));
                }
            }
            0x95 => {
                r.take(8)?; // FRAME: a length hint only
            }
            b'.' => return stack.pop().ok_or_else(|| err("STOP with an empty stack")),
            b'}' => stack.push(Value::Dict(Rc::default())),
            b']' => stack.push(Value::List(Rc::default())),
            b')' => stack.push(Value::Tuple(Rc::new(Vec::new()))),
            b'(' => marks.push(stack.len()),
            b'N' => stack.push(Value::None),
            0x88 => stack.push(Value::Bool(true)),
            0x89 => stack.push(Value::Bool(false)),
            b'J' => {
                let s = r.take(4)?;
                stack.push(Value::Int(i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as i64));
            }
            b'K' => stack.push(Value::Int(r.u8()? as i64)),
            b'M' => {
                let s = r.take(2)?;
                stack.push(Value::Int(u16::from_le_bytes([s[0], s[1]]) as i64));
            }
            0x8a => {
                let n = r.u8()? as usize;
                if n > 8 {
                    return Err(err(format!("LONG1 of {n} bytes does not fit 64 bits")));
                }
                let s = r.take(n)?;
                let mut buf = if s.last().is_some_and(|&b| b & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                buf[..n].copy_from_slice(s);
                stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let s = r.take(8)?;
                let mut b = [0u8; 8];
                b.copy_from_slice(s);
                stack.push(Value::Float(f64::from_be_bytes(b)));
            }
            b'X' | 0x8c => {
                let n = if op == b'X' { r.u32()? as usize } else { r.u8()? as usize };
                let s = std::str::from_utf8(r.take(n)?).map_err(|_| err(format!("string at byte {at} is not UTF-8")))?;
                stack.push(Value::Str(s.to_string()));
            }
            b'c' => {
                let module = r.line()?;
                let name = r.line()?;
                stack.push(Value::Global(Rc::new(GlobalRef(resolve_global(module, name)?))));
            }
            b'q' => {
                let k = r.u8()? as u32;
                memo.insert(k, top(&stack)?.clone());
            }
            b'r' => {
                let k = r.u32()?;
                memo.insert(k, top(&stack)?.clone());
            }
            0x94 => {
                let k = memo.len() as u32;
                memo.insert(k, top(&stack)?.clone());
            }
            b'h' | b'j' => {
                let k = if op == b'h' { r.u8()? as u32 } else { r.u32()? };
                stack.push(memo.get(&k).cloned().ok_or_else(|| err(format!("memo key {k} not defined")))?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(err("TUPLEn with too few items"));
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                stack.push(Value::Tuple(Rc::new(items)));
            }
            b'a' => {
                let v = pop(&mut stack)?;
                list_of(top(&stack)?)?.borrow_mut().push(v);
            }
            b'e' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                list_of(top(&stack)?)?.borrow_mut().extend(items);
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                dict_of(top(&stack)?)?.borrow_mut().push((k, v));
            }
            b'u' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                if items.len() % 2 != 0 {
                    return Err(err("SETITEMS with an odd number of items"));
                }
                let d = dict_of(top(&stack)?)?;
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.borrow_mut().push((k, v));
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(persistent_load(&pid)?);
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let f = pop(&mut stack)?;
                stack.push(reduce(&f, &args)?);
            }
            b'b' => {
                // BUILD sets instance state (an OrderedDict's `_metadata`): not needed, dropped.
                pop(&mut stack)?;
                top(&stack)?;
            }
            other => return Err(err(format!("opcode 0x{other:02x} at byte {at} is not supported in a checkpoint"))),
        }
    }
}

fn top(stack: &[Value]) -> Result<&Value> {
    stack.last().ok_or_else(|| err("stack underflow"))
}

fn pop(stack: &mut Vec<Value>) -> Result<Value> {
    stack.pop().ok_or_else(|| err("stack underflow"))
}

fn pop_mark(stack: &mut Vec<Value>, marks: &mut Vec<usize>) -> Result<Vec<Value>> {
    let m = marks.pop().ok_or_else(|| err("no MARK on the stack"))?;
    if m > stack.len() {
        return Err(err("MARK above the stack top"));
    }
    Ok(stack.split_off(m))
}

fn list_of(v: &Value) -> Result<&Shared<Vec<Value>>> {
    match v {
        Value::List(l) => Ok(l),
        _ => Err(err("APPEND to something that is not a list")),
    }
}

fn dict_of(v: &Value) -> Result<&Shared<Vec<(Value, Value)>>> {
    match v {
        Value::Dict(d) => Ok(d),
        _ => Err(err("SETITEM on something that is not a dict")),
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
        ("torch", storage) => StorageDtype::from_global(storage)
            .map(Global::Storage)
            .ok_or_else(|| err(format!("storage type torch.{storage} is not supported"))),
        _ => Err(err(format!("refusing global {module}.{name}: a checkpoint should only hold tensors"))),
    }
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| err(format!("{what} too large"))),
        _ => Err(err(format!("{what} is not a non-negative integer"))),
    }
}

fn usize_tuple(v: &Value, what: &str) -> Result<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| as_usize(x, what)).collect(),
        _ => Err(err(format!("{what} is not a tuple"))),
    }
}

/// `('storage', torch.XStorage, key, location, numel)` → a storage handle.
fn persistent_load(pid: &Value) -> Result<Value> {
    let t = match pid {
        Value::Tuple(t) if t.len() == 5 => t,
        _ => return Err(err("persistent id is not a 5-tuple")),
    };
    match (&t[0], &t[1], &t[2]) {
        (Value::Str(tag), Value::Global(g), Value::Str(key)) if tag == "storage" => match g.0 {
            Global::Storage(dtype) => Ok(Value::Storage(Rc::new((dtype, key.clone())))),
            _ => Err(err("persistent id names no storage type")),
        },
        _ => Err(err("persistent id is not ('storage', type, key, location, numel)")),
    }
}

fn reduce(f: &Value, args: &Value) -> Result<Value> {
    let g = match f {
        Value::Global(g) => &g.0,
        _ => return Err(err("REDUCE on something that is not an allowed global")),
    };
    let args = match args {
        Value::Tuple(t) => t,
        _ => return Err(err("REDUCE arguments are not a tuple")),
    };
    match g {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
        Global::RebuildTensor if args.len() >= 4 => {
            let (dtype, key) = match &args[0] {
                Value::Storage(s) => (s.0, s.1.clone()),
                _ => return Err(err("_rebuild_tensor_v2 without a storage")),
            };
            let offset = as_usize(&args[1], "tensor offset")?;
            let size = usize_tuple(&args[2], "tensor size")?;
            let stride = usize_tuple(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(err(format!("tensor of sizes {size:?} has strides {stride:?}")));
            }
            Ok(Value::Tensor(Rc::new(TensorRef { dtype, key, offset, size, stride })))
        }
        _ => Err(err(format!("unsupported call of {g:?} with {} arguments", args.len()))),
    }
}

/// Emits pickle protocol 2 the way `torch.save` does for an `OrderedDict` of tensors.
/// `storage_numel` gives each storage's element count (torch reads exactly that many); a key
/// missing from it is taken to be exactly as large as the tensor viewing it.
pub fn write_state_dict(tensors: &[(String, TensorRef)], storage_numel: &HashMap<String, usize>) -> Vec<u8> {
    let mut o = vec![0x80, 2];
    global(&mut o, "collections", "OrderedDict");
    o.extend_from_slice(b")R");
    for chunk in tensors.chunks(1000) {
        o.push(b'(');
        for (name, t) in chunk {
            unicode(&mut o, name);
            global(&mut o, "torch._utils", "_rebuild_tensor_v2");
            o.push(b'(');
            // Persistent id.
            o.push(b'(');
            unicode(&mut o, "storage");
            let storage = match t.dtype {
                StorageDtype::F32 => "FloatStorage",
                StorageDtype::F16 => "HalfStorage",
                StorageDtype::Bf16 => "BFloat16Storage",
                StorageDtype::I64 => "LongStorage",
                StorageDtype::I32 => "IntStorage",
            };
            global(&mut o, "torch", storage);
            unicode(&mut o, &t.key);
            unicode(&mut o, "cpu");
            let numel = storage_numel.get(&t.key).copied().unwrap_or_else(|| t.size.iter().product::<usize>());
            int(&mut o, numel as i64);
            o.extend_from_slice(b"tQ");
            int(&mut o, t.offset as i64);
            int_tuple(&mut o, &t.size);
            int_tuple(&mut o, &t.stride);
            o.push(0x89); // requires_grad = False
            global(&mut o, "collections", "OrderedDict");
            o.extend_from_slice(b")R"); // backward_hooks
            o.extend_from_slice(b"tR");
        }
        o.push(b'u');
    }
    o.push(b'.');
    o
}

fn global(o: &mut Vec<u8>, module: &str, name: &str) {
    o.push(b'c');
    o.extend_from_slice(module.as_bytes());
    o.push(b'\n');
    o.extend_from_slice(name.as_bytes());
    o.push(b'\n');
}

fn unicode(o: &mut Vec<u8>, s: &str) {
    o.push(b'X');
    o.extend_from_slice(&(s.len() as u32).to_le_bytes());
    o.extend_from_slice(s.as_bytes());
}

fn int(o: &mut Vec<u8>, v: i64) {
    if (0..256).contains(&v) {
        o.extend_from_slice(&[b'K', v as u8]);
    } else if (0..65536).contains(&v) {
        o.push(b'M');
        o.extend_from_slice(&(v as u16).to_le_bytes());
    } else if i32::try_from(v).is_ok() {
        o.push(b'J');
        o.extend_from_slice(&(v as i32).to_le_bytes());
    } else {
        o.extend_from_slice(&[0x8a, 8]);
        o.extend_from_slice(&v.to_le_bytes());
    }
}

fn int_tuple(o: &mut Vec<u8>, v: &[usize]) {
    o.push(b'(');
    for &x in v {
        int(o, x as i64);
    }
    o.push(b't');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, TensorRef)> {
        vec![
            ("a.weight".into(), TensorRef { dtype: StorageDtype::F32, key: "0".into(), offset: 0, size: vec![3, 2], stride: vec![1, 3] }),
            ("b".into(), TensorRef { dtype: StorageDtype::F16, key: "1".into(), offset: 70000, size: vec![], stride: vec![] }),
        ]
    }

    fn entries(v: &Value) -> Vec<(String, TensorRef)> {
        match v {
            Value::Dict(d) => d
                .borrow()
                .iter()
                .map(|(k, v)| match (k, v) {
                    (Value::Str(k), Value::Tensor(t)) => (k.clone(), (**t).clone()),
                    other => panic!("unexpected {other:?}"),
                })
                .collect(),
            other => panic!("not a dict: {other:?}"),
        }
    }

    #[test]
    fn writer_output_loads_back() {
        let v = load(&write_state_dict(&sample(), &HashMap::new())).unwrap();
        assert_eq!(entries(&v), sample());
    }

    #[test]
    fn long1_is_sign_extended() {
        let v = load(&[0x80, 2, 0x8a, 2, 0x00, 0xff, b'.']).unwrap();
        assert!(matches!(v, Value::Int(-256)));
    }

    #[test]
    fn unknown_globals_and_opcodes_are_refused() {
        let e = load(b"\x80\x02cos\nsystem\n.").unwrap_err().to_string();
        assert!(e.contains("os.system"), "{e}");
        let e = load(b"\x80\x02I12\n.").unwrap_err().to_string();
        assert!(e.contains("0x49"), "{e}");
    }

    #[test]
    fn truncated_and_malformed_pickles_are_errors() {
        let p = write_state_dict(&sample(), &HashMap::new());
        for cut in 0..p.len() {
            assert!(load(&p[..cut]).is_err(), "cut at {cut}");
        }
        assert!(load(b"\x80\x02h\x05.").is_err()); // undefined memo
        assert!(load(b"\x80\x02u.").is_err()); // SETITEMS without a mark
        assert!(load(b"\x80\x02K\x01K\x02s.").is_err()); // SETITEM on an int
    }
}
