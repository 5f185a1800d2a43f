//! Who is on the other end of a connection, for the log and for the command's
//! environment.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{getpeername, getsockname, getsockopt, sockopt, SockaddrStorage};

/// The address family of a listening socket, and so of its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Tcp,
    Unix,
}

/// The peer of an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp {
        remote: SocketAddr,
        local: SocketAddr,
    },
    Unix {
        pid: i32,
        uid: u32,
        gid: u32,
    },
}

impl Peer {
    /// Reads the peer of `conn`, accepted on a listener of `family`.
    pub fn of(conn: &OwnedFd, family: Family) -> nix::Result<Peer> {
        match family {
            Family::Tcp => Ok(Peer::Tcp {
                remote: ip_addr(getpeername::<SockaddrStorage>(conn.as_raw_fd())?)?,
                local: ip_addr(getsockname::<SockaddrStorage>(conn.as_raw_fd())?)?,
            }),
            Family::Unix => {
                let cred = getsockopt(conn, sockopt::PeerCredentials)?;
                Ok(Peer::Unix {
                    pid: cred.pid(),
                    uid: cred.uid(),
                    gid: cred.gid(),
                })
            }
        }
    }

    /// The variables that describe the peer to the command: systemd's
    /// `Accept=yes` names (`REMOTE_ADDR`, `REMOTE_PORT`) and UCSPI's.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        match self {
            Peer::Tcp { remote, local } => {
                let proto = if remote.is_ipv4() { "TCP" } else { "TCP6" };
                vec![
                    ("PROTO", proto.to_owned()),
                    ("TCPREMOTEIP", remote.ip().to_string()),
                    ("TCPREMOTEPORT", remote.port().to_string()),
                    ("TCPLOCALIP", local.ip().to_string()),
                    ("TCPLOCALPORT", local.port().to_string()),
                    ("REMOTE_ADDR", remote.ip().to_string()),
                    ("REMOTE_PORT", remote.port().to_string()),
                ]
            }
            Peer::Unix { pid, uid, gid } => vec![
                ("PROTO", "UNIX".to_owned()),
                ("UNIXREMOTEEUID", uid.to_string()),
                ("UNIXREMOTEEGID", gid.to_string()),
                ("UNIXREMOTEPID", pid.to_string()),
            ],
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp { remote, .. } => write!(f, "{remote}"),
            Peer::Unix { pid, uid, gid } => write!(f, "unix:pid={pid},uid={uid},gid={gid}"),
        }
    }
}

/// Converts a socket address to std's, showing IPv4-mapped IPv6 addresses
/// (from a dual-stack `[::]` socket) as the IPv4 addresses they are.
fn ip_addr(addr: SockaddrStorage) -> nix::Result<SocketAddr> {
    let sa = if let Some(v4) = addr.as_sockaddr_in() {
        SocketAddr::from((v4.ip(), v4.port()))
    } else if let Some(v6) = addr.as_sockaddr_in6() {
        let ip = v6.ip();
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        SocketAddr::from((ip, v6.port()))
    } else {
        return Err(nix::errno::Errno::EAFNOSUPPORT);
    };
    Ok(sa)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_env_has_ucspi_and_systemd_names() {
        let p = Peer::Tcp {
            remote: "10.0.0.2:5000".parse().unwrap(),
            local: "10.0.0.1:9009".parse().unwrap(),
        };
        let env = p.env();
        assert!(env.contains(&("PROTO", "TCP".into())));
        assert!(env.contains(&("REMOTE_ADDR", "10.0.0.2".into())));
        assert!(env.contains(&("TCPLOCALPORT", "9009".into())));
        assert_eq!(p.to_string(), "10.0.0.2:5000");
    }
}
