//! The `warren.v1.Policies` gRPC service: policies stored on the server, and the check that
//! shares the create path's evaluator (docs/policy.md).

use tonic::{Request, Response, Status};
use warren_proto::v1::{self, policies_server::Policies};
use warren_proto::{decision_to_pb, spec_from_pb};
use warren_spec::PolicySpec;

use crate::grpc::status_of;
use crate::plane::{ControlPlane, PolicyEntry};

#[derive(Debug, Clone)]
pub struct PolicyService {
    plane: ControlPlane,
}

impl PolicyService {
    pub fn new(plane: ControlPlane) -> Self {
        PolicyService { plane }
    }

    fn to_pb(&self, e: &PolicyEntry) -> Result<v1::Policy, Status> {
        let spec_json = serde_json::to_string(e.policy.spec())
            .map_err(|err| Status::internal(err.to_string()))?;
        Ok(v1::Policy {
            name: e.policy.name().to_string(),
            spec_json,
            hash: e.policy.hash().to_string(),
            revision: e.revision,
            created_at_ms: e.created_at_ms,
            updated_at_ms: e.updated_at_ms,
            sandboxes: self.plane.sandboxes_under(e.policy.name()),
        })
    }
}

/// Reads a policy spec sent as JSON; errors name the field and the value.
fn policy_spec(json: &str) -> Result<PolicySpec, Status> {
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_string()
        } else {
            format!("spec.{path}")
        };
        Status::invalid_argument(format!("invalid policy: {field}: {}", e.into_inner()))
    })
}

#[tonic::async_trait]
impl Policies for PolicyService {
    async fn apply_policy(
        &self,
        req: Request<v1::ApplyPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyResponse>, Status> {
        let req = req.into_inner();
        let spec = policy_spec(&req.spec_json)?;
        let (entry, created, changed) = self
            .plane
            .apply_policy(&req.name, spec)
            .await
            .map_err(status_of)?;
        Ok(Response::new(v1::ApplyPolicyResponse {
            policy: Some(self.to_pb(&entry)?),
            created,
            changed,
        }))
    }

    async fn get_policy(
        &self,
        req: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let entry = self
            .plane
            .get_policy(&req.into_inner().name)
            .map_err(status_of)?;
        Ok(Response::new(self.to_pb(&entry)?))
    }

    async fn list_policies(
        &self,
        _req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        let policies = self
            .plane
            .list_policies()
            .iter()
            .map(|e| self.to_pb(e))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(v1::ListPoliciesResponse {
            policies,
            default_policy: self.plane.default_policy(),
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let entry = self
            .plane
            .delete_policy(&req.into_inner().name)
            .await
            .map_err(status_of)?;
        let mut pb = self.to_pb(&entry)?;
        pb.sandboxes.clear();
        Ok(Response::new(pb))
    }

    async fn check_policy(
        &self,
        req: Request<v1::CheckPolicyRequest>,
    ) -> Result<Response<v1::PolicyDecision>, Status> {
        let req = req.into_inner();
        let pb = req
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid sandbox spec: spec: missing"))?;
        let spec = spec_from_pb(pb)
            .map_err(|e| Status::invalid_argument(format!("invalid sandbox spec: {e}")))?;
        use v1::check_policy_request::Policy as Which;
        let (name, inline) = match req.policy {
            Some(Which::Name(n)) => (Some(n), None),
            Some(Which::SpecJson(json)) => {
                (None, Some(("inline".to_string(), policy_spec(&json)?)))
            }
            None => (None, None),
        };
        let decision = self
            .plane
            .check_policy(&spec, name.as_deref(), inline)
            .map_err(status_of)?;
        Ok(Response::new(match decision {
            Some(d) => decision_to_pb(&d),
            // No policy applies: admitted by nothing.
            None => v1::PolicyDecision {
                mode: "enforce".into(),
                admitted: true,
                ..Default::default()
            },
        }))
    }
}
