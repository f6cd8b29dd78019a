//! Free TCP ports on the loopback interface for the components to listen on.
//!
//! Ports are picked by binding `127.0.0.1:0` and are all held until every one is chosen, so
//! one cluster never gets the same port twice. Another program may still take a port
//! between the pick and the component binding it; the component then fails to start and
//! the start error shows its log.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::{Context, Result};

/// The ports one cluster listens on, all on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ports {
    pub(crate) etcd_client: u16,
    pub(crate) etcd_peer: u16,
    pub(crate) apiserver: u16,
    pub(crate) controller_manager: u16,
    pub(crate) scheduler: u16,
    pub(crate) kwok: u16,
}

impl Ports {
    pub(crate) fn pick() -> Result<Self> {
        let listeners = (0..6)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("binding 127.0.0.1:0 to find free ports")?;
        let ports = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|addr| addr.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            etcd_client: ports[0],
            etcd_peer: ports[1],
            apiserver: ports[2],
            controller_manager: ports[3],
            scheduler: ports[4],
            kwok: ports[5],
        })
    }
}
