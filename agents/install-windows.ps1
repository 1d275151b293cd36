#Requires -Version 5.1
#Requires -RunAsAdministrator
<#
.SYNOPSIS
  Installs (or removes) the vm-healthcheck agent as a Scheduled Task running as SYSTEM.
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-windows.ps1 -Server http://monitor:3000 -Token TOKEN
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-windows.ps1 -Uninstall
#>
[CmdletBinding()]
param(
    [string]$Server,
    [string]$Token,
    [ValidateRange(5, 3600)][int]$Interval = 30,
    [string]$Vmid = '',
    [string]$Node = '',
    [switch]$Uninstall
)

Set-StrictMode -Version 2.0
$ErrorActionPreference = 'Stop'
[Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12

$TaskName = 'vm-healthcheck-agent'
$InstallDir = Join-Path $env:ProgramFiles 'vm-healthcheck'
$AgentPath = Join-Path $InstallDir 'windows-agent.ps1'
$ConfigDir = Join-Path $env:ProgramData 'vm-healthcheck'
$ConfigPath = Join-Path $ConfigDir 'agent.conf'

if ($Uninstall) {
    Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false -ErrorAction SilentlyContinue
    Remove-Item -LiteralPath $InstallDir -Recurse -Force -ErrorAction SilentlyContinue
    Remove-Item -LiteralPath $ConfigDir -Recurse -Force -ErrorAction SilentlyContinue
    Write-Host '==> vm-healthcheck agent uninstalled'
    exit 0
}

if (-not $Server) { throw '-Server URL is required' }
if (-not $Token) { throw '-Token is required' }
$Server = $Server.TrimEnd('/')

New-Item -ItemType Directory -Force -Path $InstallDir, $ConfigDir | Out-Null
Write-Host "==> downloading the agent from $Server"
Invoke-WebRequest -Uri "$Server/agents/windows-agent.ps1" -OutFile $AgentPath -UseBasicParsing

# Only SYSTEM and Administrators may read the folder holding the token.
$acl = New-Object System.Security.AccessControl.DirectorySecurity
$acl.SetAccessRuleProtection($true, $false)
foreach ($sid in @('S-1-5-18', 'S-1-5-32-544')) {
    $identity = New-Object System.Security.Principal.SecurityIdentifier($sid)
    $rule = New-Object System.Security.AccessControl.FileSystemAccessRule($identity, 'FullControl', 'ContainerInherit,ObjectInherit', 'None', 'Allow')
    $acl.AddAccessRule($rule)
}
Set-Acl -LiteralPath $ConfigDir -AclObject $acl

$lines = @(
    '# vm-healthcheck agent configuration (written by install-windows.ps1)',
    "SERVER_URL=$Server",
    "AGENT_TOKEN=$Token",
    "INTERVAL_SECONDS=$Interval",
    "VMID=$Vmid",
    "NODE=$Node"
)
[IO.File]::WriteAllLines($ConfigPath, $lines)
Write-Host "==> wrote $ConfigPath (SYSTEM and Administrators only)"

$action = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -ExecutionPolicy Bypass -File `"$AgentPath`" -Tick"
$everyMinute = New-ScheduledTaskTrigger -Once -At (Get-Date) -RepetitionInterval (New-TimeSpan -Minutes 1)
$atStartup = New-ScheduledTaskTrigger -AtStartup
$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
$settings = New-ScheduledTaskSettingsSet -MultipleInstances IgnoreNew -ExecutionTimeLimit (New-TimeSpan -Minutes 2) -StartWhenAvailable
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger @($atStartup, $everyMinute) `
    -Principal $principal -Settings $settings -Force | Out-Null
Write-Host "==> registered the '$TaskName' Scheduled Task (SYSTEM, at start-up and every minute)"

Write-Host '==> sending a first report'
& powershell.exe -NoProfile -ExecutionPolicy Bypass -File $AgentPath -Once -ConfigPath $ConfigPath
if ($LASTEXITCODE -ne 0) { throw 'installed, but the first report was not accepted (see the message above)' }
Write-Host "==> done: this VM now reports to $Server"
