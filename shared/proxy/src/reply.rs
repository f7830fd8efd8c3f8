//! Local replies: the filter answers the client itself.

/// A response the filter sends in place of the upstream's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u32,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl LocalReply {
    /// Sends the reply on the current stream. Returns `false` if the host refused (the stream is
    /// gone): there is nobody left to answer.
    pub fn send(&self) -> bool {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        crate::host::send_local_response(self.status, &headers, &self.body).is_ok()
    }
}
