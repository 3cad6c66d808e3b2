//! The terminal modes a client sends with its pty request (RFC 4254 section 8): its erase and
//! interrupt characters, echo, CR/NL translation and so on, applied to the new pty the way
//! OpenSSH's sshd does, so that Backspace and Ctrl-C behave as on the user's own terminal.
//!
//! Opcodes this system has no flag for are ignored, as the RFC asks; a value that is not a valid
//! character is ignored too. Nothing here can fail the session: a pty whose modes could not be set
//! keeps the system's defaults.

use nix::sys::termios::{
    self, BaudRate, ControlFlags, InputFlags, LocalFlags, OutputFlags, SetArg, SpecialCharacterIndices as Cc, Termios,
};
use russh::Pty;
use std::os::fd::AsFd;

/// The most modes kept from one request (the RFC defines fewer than 70 opcodes).
pub const MAX_MODES: usize = 128;

/// Applies `modes` to the terminal `fd` (the pty's slave side, before the shell starts). The pty
/// request handler has already cut the client's list to [`MAX_MODES`].
pub fn apply<Fd: AsFd>(fd: Fd, modes: &[(Pty, u32)]) -> nix::Result<()> {
    if modes.is_empty() {
        return Ok(());
    }
    let mut t = termios::tcgetattr(&fd)?;
    for (op, value) in modes {
        set(&mut t, *op, *value);
    }
    termios::tcsetattr(&fd, SetArg::TCSANOW, &t)
}

/// One mode into `t`.
pub fn set(t: &mut Termios, op: Pty, value: u32) {
    let on = value != 0;
    if let Some(cc) = special_char(op) {
        // 255 means "disabled" in SSH; the kernel's _POSIX_VDISABLE is 0.
        let c = match value {
            255 => 0,
            v => match u8::try_from(v) {
                Ok(c) => c,
                Err(_) => return,
            },
        };
        t.control_chars[cc as usize] = c;
        return;
    }
    if let Some(f) = input_flag(op) {
        t.input_flags.set(f, on);
    } else if let Some(f) = local_flag(op) {
        t.local_flags.set(f, on);
    } else if let Some(f) = output_flag(op) {
        t.output_flags.set(f, on);
    } else {
        match op {
            Pty::CS7 if on => {
                t.control_flags.remove(ControlFlags::CSIZE);
                t.control_flags.insert(ControlFlags::CS7);
            }
            Pty::CS8 if on => {
                t.control_flags.remove(ControlFlags::CSIZE);
                t.control_flags.insert(ControlFlags::CS8);
            }
            Pty::PARENB => t.control_flags.set(ControlFlags::PARENB, on),
            Pty::PARODD => t.control_flags.set(ControlFlags::PARODD, on),
            Pty::TTY_OP_ISPEED => {
                if let Some(b) = baud(value) {
                    let _ = termios::cfsetispeed(t, b);
                }
            }
            Pty::TTY_OP_OSPEED => {
                if let Some(b) = baud(value) {
                    let _ = termios::cfsetospeed(t, b);
                }
            }
            _ => {}
        }
    }
}

fn special_char(op: Pty) -> Option<Cc> {
    Some(match op {
        Pty::VINTR => Cc::VINTR,
        Pty::VQUIT => Cc::VQUIT,
        Pty::VERASE => Cc::VERASE,
        Pty::VKILL => Cc::VKILL,
        Pty::VEOF => Cc::VEOF,
        Pty::VEOL => Cc::VEOL,
        Pty::VEOL2 => Cc::VEOL2,
        Pty::VSTART => Cc::VSTART,
        Pty::VSTOP => Cc::VSTOP,
        Pty::VSUSP => Cc::VSUSP,
        Pty::VREPRINT => Cc::VREPRINT,
        Pty::VWERASE => Cc::VWERASE,
        Pty::VLNEXT => Cc::VLNEXT,
        Pty::VDISCARD => Cc::VDISCARD,
        _ => return None,
    })
}

fn input_flag(op: Pty) -> Option<InputFlags> {
    Some(match op {
        Pty::IGNPAR => InputFlags::IGNPAR,
        Pty::PARMRK => InputFlags::PARMRK,
        Pty::INPCK => InputFlags::INPCK,
        Pty::ISTRIP => InputFlags::ISTRIP,
        Pty::INLCR => InputFlags::INLCR,
        Pty::IGNCR => InputFlags::IGNCR,
        Pty::ICRNL => InputFlags::ICRNL,
        Pty::IXON => InputFlags::IXON,
        Pty::IXANY => InputFlags::IXANY,
        Pty::IXOFF => InputFlags::IXOFF,
        Pty::IMAXBEL => InputFlags::IMAXBEL,
        Pty::IUTF8 => InputFlags::IUTF8,
        _ => return None,
    })
}

fn local_flag(op: Pty) -> Option<LocalFlags> {
    Some(match op {
        Pty::ISIG => LocalFlags::ISIG,
        Pty::ICANON => LocalFlags::ICANON,
        Pty::ECHO => LocalFlags::ECHO,
        Pty::ECHOE => LocalFlags::ECHOE,
        Pty::ECHOK => LocalFlags::ECHOK,
        Pty::ECHONL => LocalFlags::ECHONL,
        Pty::NOFLSH => LocalFlags::NOFLSH,
        Pty::TOSTOP => LocalFlags::TOSTOP,
        Pty::IEXTEN => LocalFlags::IEXTEN,
        Pty::ECHOCTL => LocalFlags::ECHOCTL,
        Pty::ECHOKE => LocalFlags::ECHOKE,
        Pty::PENDIN => LocalFlags::PENDIN,
        _ => return None,
    })
}

fn output_flag(op: Pty) -> Option<OutputFlags> {
    Some(match op {
        Pty::OPOST => OutputFlags::OPOST,
        Pty::OLCUC => OutputFlags::OLCUC,
        Pty::ONLCR => OutputFlags::ONLCR,
        Pty::OCRNL => OutputFlags::OCRNL,
        Pty::ONOCR => OutputFlags::ONOCR,
        Pty::ONLRET => OutputFlags::ONLRET,
        _ => return None,
    })
}

/// The baud rate for a speed in bits per second, if it is a standard one.
fn baud(bps: u32) -> Option<BaudRate> {
    Some(match bps {
        9600 => BaudRate::B9600,
        19200 => BaudRate::B19200,
        38400 => BaudRate::B38400,
        57600 => BaudRate::B57600,
        115200 => BaudRate::B115200,
        230400 => BaudRate::B230400,
        460800 => BaudRate::B460800,
        500000 => BaudRate::B500000,
        921600 => BaudRate::B921600,
        1000000 => BaudRate::B1000000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_clients_modes_reach_a_real_pty() {
        let (_pty, pts) = pty_process::open().unwrap();
        let before = termios::tcgetattr(&pts).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ECHO), "a new pty echoes");
        let modes = [
            (Pty::VERASE, 8),
            (Pty::VINTR, 255),
            (Pty::ECHO, 0),
            (Pty::ICRNL, 0),
            (Pty::IUTF8, 1),
            (Pty::ONLCR, 0),
            (Pty::TTY_OP_OSPEED, 38400),
            // Out of range or unknown to this system: ignored.
            (Pty::VKILL, 1000),
            (Pty::VDSUSP, 25),
            (Pty::TTY_OP_END, 0),
        ];
        apply(&pts, &modes).unwrap();
        let t = termios::tcgetattr(&pts).unwrap();
        assert_eq!(t.control_chars[Cc::VERASE as usize], 8);
        assert_eq!(t.control_chars[Cc::VINTR as usize], 0, "255 disables the character");
        assert_eq!(t.control_chars[Cc::VKILL as usize], before.control_chars[Cc::VKILL as usize]);
        assert!(!t.local_flags.contains(LocalFlags::ECHO));
        assert!(!t.input_flags.contains(InputFlags::ICRNL));
        assert!(t.input_flags.contains(InputFlags::IUTF8));
        assert!(!t.output_flags.contains(OutputFlags::ONLCR));
        assert_eq!(termios::cfgetospeed(&t), BaudRate::B38400);
    }

    #[tokio::test]
    async fn no_modes_leave_the_defaults() {
        let (_pty, pts) = pty_process::open().unwrap();
        let before = termios::tcgetattr(&pts).unwrap();
        apply(&pts, &[]).unwrap();
        let after = termios::tcgetattr(&pts).unwrap();
        assert_eq!(before.local_flags, after.local_flags);
        assert_eq!(before.control_chars, after.control_chars);
    }
}
