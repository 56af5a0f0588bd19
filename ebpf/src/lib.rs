//! Palisade's datapath: TC programs on the host side of each pod's veth.
//!
//! `pod_veth` holds the two attach points; the shared logic lives in small modules in the
//! order a packet meets them: `parse` (into a `packet`), `conntrack`, `policy`, `events`. All
//! state is in `maps`.
#![no_std]
#![no_main]

mod conntrack;
mod dns;
mod egress;
mod events;
mod maps;
mod packet;
mod parse;
mod pod_veth;
mod policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
