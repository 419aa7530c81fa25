//! qemu-based tests of the QED driver.
