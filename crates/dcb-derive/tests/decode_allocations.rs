//! Decoding an enum of typed events allocates nothing of its own per event: the read types of
//! its wrapped events are computed once, not listed again for every event.
use crablet::{DomainEvent, Event, NewEvent};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts this thread's allocations while `COUNTING` is set.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: the thread locals may be gone while a thread shuts down.
        let _ = COUNTING.try_with(|counting| {
            if counting.get() {
                let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            }
        });
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Debug, PartialEq, DomainEvent)]
struct Restocked {
    quantity: u32,
}

#[derive(Debug, PartialEq, DomainEvent)]
struct Sold {
    quantity: u32,
}

#[derive(Debug, PartialEq, DomainEvent)]
enum StockEvent {
    Restocked(Restocked),
    Sold(Sold),
}

#[test]
fn enum_decode_allocates_nothing_per_event() {
    let new = StockEvent::Sold(Sold { quantity: 2 })
        .encode()
        .expect("encode");
    let event = Event {
        cursor: crablet::Cursor::new(1, 1),
        event_type: new.event_type,
        tags: new.tags,
        data: new.data,
        metadata: None,
        occurred_at: std::time::SystemTime::now(),
    };
    // The first decode computes what is computed once.
    assert_eq!(
        StockEvent::decode(&event).expect("decode"),
        StockEvent::Sold(Sold { quantity: 2 })
    );
    COUNTING.with(|c| c.set(true));
    for _ in 0..100 {
        let decoded = StockEvent::decode(&event);
        assert!(decoded.is_ok());
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCATIONS.with(Cell::get), 0);
    let _ = NewEvent::builder("unused");
}
